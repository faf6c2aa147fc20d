import pytest
import torch

from pyprotoclip.models import TINY_MODELS, create_model, get_model_config, list_models


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_tiny_models_forward(name):
    assert name in TINY_MODELS and name in list_models()
    model, pre_train, pre_val, tok = create_model(name, seed=0)
    from PIL import Image

    img = pre_val(Image.new("RGB", (80, 64), (200, 30, 30)))
    assert img.shape == (3, 64, 64)
    text = tok(["a red circle", "a blue star"])
    assert text.shape == (2, 32) and text.dtype == torch.long
    out = model(torch.stack([img, pre_train(Image.new("RGB", (64, 64)))]), text)
    d = get_model_config(name)["embed_dim"]
    assert out["image_features"].shape == (2, d) and out["text_features"].shape == (2, d)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    assert float(out["logit_scale"].detach()) == pytest.approx(1 / 0.07, rel=1e-5)


def test_open_clip_architecture_by_name():
    cfg = get_model_config("ViT-B-32")
    assert cfg["vision_cfg"]["patch_size"] == 32


def test_seed_makes_init_deterministic():
    a = create_model("tiny-vit", seed=3)[0].state_dict()
    b = create_model("tiny-vit", seed=3)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_file_roundtrip(tmp_path):
    src = create_model("tiny-rn", seed=1)[0]
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = create_model("tiny-rn", pretrained=str(path), seed=2)[0]
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="model: unknown architecture"):
        create_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="pretrained"):
        create_model("tiny-vit", pretrained=str(tmp_path / "missing.pt"))
    torch.save(create_model("tiny-rn")[0].state_dict(), tmp_path / "rn.pt")
    with pytest.raises(ValueError, match="pretrained: .* does not match"):
        create_model("tiny-vit", pretrained=str(tmp_path / "rn.pt"))
    with pytest.raises(ValueError, match="precision"):
        create_model("tiny-vit", precision="fp8")


def _run(code: str) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_registers_the_tiny_configs_with_open_clip_in_either_order():
    # pyprotoclip first: open_clip is not imported by it, and sees the configs once it is
    got = _run("import sys, pyprotoclip; light = 'open_clip' not in sys.modules; import open_clip; "
               "print(light, 'tiny-rn' in open_clip.list_models(), 'tiny-vit' in open_clip.list_models())")
    assert got == "True True True"
    # open_clip first (in this process: take the configs out of its registry, then install again)
    import open_clip
    import open_clip.factory as ocf

    from pyprotoclip.models import _open_clip_hook

    paths = list(ocf._MODEL_CONFIG_PATHS)
    try:
        ocf._MODEL_CONFIG_PATHS[:] = [p for p in paths if p != _open_clip_hook.CONFIG_DIR]
        for name in ("tiny-rn", "tiny-vit"):
            ocf._MODEL_CONFIGS.pop(name, None)
        assert "tiny-rn" not in open_clip.list_models()
        _open_clip_hook.install()
        assert "tiny-rn" in open_clip.list_models() and open_clip.get_model_config("tiny-vit")["embed_dim"] == 128
    finally:
        ocf._MODEL_CONFIG_PATHS[:] = paths
        ocf._rescan_model_configs()


def test_a_pyprotoclip_checkpoint_loads_in_open_clip(tmp_path):
    import open_clip

    from pyprotoclip.checkpoint import load_checkpoint, save_checkpoint
    from pyprotoclip.models import export_weights

    src = create_model("tiny-rn", seed=4)[0]
    # a CLIP training checkpoint as the trainer writes it (the extras are weights_only-loadable too)
    ckpt = tmp_path / "epoch_1.pt"
    save_checkpoint({"format": "pyprotoclip-train-v1", "step": 3, "epoch": 1, "model": "tiny-rn", "method": "clip",
                     "state_dict": src.state_dict(), "method_keys": [], "optimizer": {"state": {}, "param_groups": []},
                     "rng": [{"python": (3, tuple(range(5)), None)}]}, str(ckpt))
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-rn", pretrained=str(ckpt))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())
    # a method's additions (ProtoCLIP's heads) make open_clip's strict load fail: export_weights leaves them out
    extra = {**src.state_dict(), "image_head.0.weight": torch.zeros(2, 2)}
    save_checkpoint({"model": "tiny-rn", "state_dict": extra, "method_keys": ["image_head.0.weight"]}, str(ckpt))
    with pytest.raises(RuntimeError, match="image_head"):
        open_clip.create_model_and_transforms("tiny-rn", pretrained=str(ckpt))
    out = export_weights(str(ckpt), str(tmp_path / "weights.pt"))
    assert set(load_checkpoint(out)) == set(src.state_dict())
    model = open_clip.create_model_and_transforms("tiny-rn", pretrained=out)[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())


def test_infer_architecture_from_shapes():
    from pyprotoclip.models import infer_architecture

    for name in ("tiny-rn", "tiny-vit"):
        state = create_model(name, seed=0)[0].state_dict()
        assert infer_architecture(state) == name
        assert infer_architecture({f"module.{k}": v for k, v in state.items()}) == name
    state = create_model("tiny-rn", seed=0)[0].state_dict()
    assert infer_architecture({k: v for k, v in state.items() if k != "logit_scale"}) is None
