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
