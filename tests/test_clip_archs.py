"""Real CLIP architectures (OpenAI ViT-B/32, B/16, L/14, QuickGELU) on random weights: open_clip -> timm tower.

The converted classifier's image features must equal open_clip's ``encode_image`` (<= 1e-5), and our eval transform
(from the classifier's pretrained_cfg) must equal open_clip's eval preprocessing. No weights are downloaded; real
weights take the same path (``load_clip("ViT-B-32-quickgelu:/path/to/weights")``).
"""
import pytest
import torch

from grace_plugin.models.clip import OPENAI_TOWERS

# ViT-L/14 (430M parameters in two copies) takes 20-55 s on 2 shared cores: marked slow (tox -e slow runs it).
ARCHS = [pytest.param(n, marks=pytest.mark.slow) if "L-14" in n else n for n in sorted(OPENAI_TOWERS)]


@pytest.mark.parametrize("model_name", ARCHS)
def test_openai_arch_conversion_matches_open_clip(model_name):
    import open_clip
    from PIL import Image

    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.models.clip import ClipBundle, classifier_from_clip

    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    clip.eval()
    bundle = ClipBundle(model_name, open_clip.get_model_config(model_name), clip)
    clf = classifier_from_clip(bundle, ["cat", "dog"], ["a photo of a {}."])
    assert type(clf.visual).__name__ == "VisionTransformer"
    size = clf.pretrained_cfg["input_size"][-1]
    img = Image.fromarray((torch.rand(size + 37, size + 90, 3, generator=torch.Generator().manual_seed(1)) * 255)
                          .byte().numpy())
    ours = eval_transform(clf.pretrained_cfg)(img)  # [0,1], no normalisation (the model normalises inside)
    theirs = preprocess(img)  # normalised
    assert ours.shape == theirs.shape == (3, size, size)
    torch.testing.assert_close(clf.normalize(ours[None])[0], theirs, rtol=0, atol=1e-6)
    x = ours[None]
    with torch.no_grad():
        f_ours = clf.visual(clf.normalize(x))
        f_ref = clip.encode_image(theirs[None])
        assert (f_ours - f_ref).abs().max().item() <= 1e-5
        # the classifier's logits are CLIP's zero-shot logits on open_clip's features (head built by open_clip)
        ref = clip.logit_scale.exp() * torch.nn.functional.normalize(f_ref, dim=-1) @ clf.head.weight.t()
        torch.testing.assert_close(clf(x), ref, rtol=1e-4, atol=1e-4)
