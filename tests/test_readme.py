"""README's Python runs as written, and the bundled folders load with plain ``from_pretrained`` (issue 20, item 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        assert "..." not in code, "a literal ... in README's code becomes a value (the prompt 'Ellipsis')"
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "q" / "diffquant_manifest.json").is_file() and (tmp_path / "q.png").is_file()


@pytest.mark.parametrize("name, cls", [("mini-sd", "StableDiffusionPipeline"), ("mini-sd3", "StableDiffusion3Pipeline")])
def test_zoo_folder_loads_with_plain_from_pretrained_and_generates(name, cls):
    import diffusers

    from diffquant.zoo import model_path

    pipe = getattr(diffusers, cls).from_pretrained(model_path(name))
    dtypes = {n: next(m.parameters()).dtype for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape[-1] == 3 and (image > 0).any()
