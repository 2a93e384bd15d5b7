import json

import pytest
import torch

from grace_plugin.checkpoint import load_run, save_run
from grace_plugin.tensor_io import CheckpointError
from grace_plugin.models.clip import load_clip, text_state_dict, tower_spec


def _save(tmp_path, model, clip_dir):
    b = load_clip(clip_dir)
    return save_run(tmp_path / "run", model, tower=tower_spec(b.model_name, b.model_cfg),
                    clip_meta={"model_name": b.model_name, "model_cfg": b.model_cfg}, text_state=text_state_dict(b),
                    classnames=[f"c{i}" for i in range(model.num_classes)], templates=["a {c}"], recipe="ft",
                    config={})


def test_roundtrip_gives_identical_logits(tmp_path, tiny_classifier, tiny_clip_dir):
    run = _save(tmp_path, tiny_classifier, tiny_clip_dir)
    model, meta = load_run(run)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), tiny_classifier(x))
    assert meta["classnames"][0] == "c0" and meta["recipe"] == "ft"
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temp files


def test_corrupt_or_mismatched_files_are_refused(tmp_path, tiny_classifier, tiny_clip_dir):
    run = _save(tmp_path, tiny_classifier, tiny_clip_dir)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_run(run)
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_run(run, check_sha256=False)


def test_head_size_mismatch_names_both_sizes(tmp_path, tiny_classifier, tiny_clip_dir):
    run = _save(tmp_path, tiny_classifier, tiny_clip_dir)
    meta = json.loads((run / "checkpoint.json").read_text())
    meta["architecture"]["num_classes"] = 7
    (run / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="10 classes but checkpoint.json says 7"):
        load_run(run)


def test_refuses_to_save_nan(tmp_path, tiny_classifier, tiny_clip_dir):
    with torch.no_grad():
        tiny_classifier.visual.head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        _save(tmp_path, tiny_classifier, tiny_clip_dir)


def test_timm_tower_matches_open_clip(tiny_clip_dir):
    """The converted timm tower reproduces open_clip's encode_image (same conversion as OpenAI ViT-B/32)."""
    from grace_plugin.models.clip import build_tower, convert_visual

    b = load_clip(tiny_clip_dir)
    tower = build_tower(tower_spec(b.model_name, b.model_cfg))
    tower.load_state_dict(convert_visual(b.clip.state_dict(), tower), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (tower.eval()(x) - b.clip.encode_image(x)).abs().max() <= 1e-5
