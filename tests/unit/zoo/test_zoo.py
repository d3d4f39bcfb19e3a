"""The built-in models of `maia-serving profile`: the library's own classes (or the published architecture),
their parameter counts against the published ones, and their outputs on maia against the CPU's."""

import pytest
import torch

from maia_serving import zoo
from maia_serving.zoo.yolo import YoloV8


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.builtin(n).published_params])
def test_parameter_count_is_the_published_one(name):
    """Built on the meta device: shapes only, so the 8 B Llama costs no memory."""
    model = zoo.builtin(name)
    with torch.device("meta"):
        example = model.build(1, None)
    assert sum(p.numel() for p in example.module.parameters()) == model.published_params, model.source


def test_yolo_gradients_leave_out_the_fixed_dfl_bins():
    """Ultralytics' summary counts 3,157,184 gradients of YOLOv8n's 3,157,200 parameters: the DFL's 16 bins
    are fixed."""
    with torch.device("meta"):
        model = YoloV8("n")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3_157_184


def _on_cpu_and_maia(name: str, batch: int, shape: int):
    import maia_serving.torch  # noqa: F401 (the device)

    torch.manual_seed(0)
    example = zoo.builtin(name).build(batch, shape)
    with torch.no_grad():
        cpu = example.module(*example.inputs)
        module = example.module.to("maia")
        maia = module(*(x.to("maia") for x in example.inputs))
    return cpu, maia


@pytest.mark.parametrize(
    "name,batch,shape,field",
    [
        ("yolov8n", 2, 64, None),
        ("vit-tiny-16", 2, 32, "logits"),
        ("unet-tiny", 2, 16, None),
        ("llama-tiny", 2, 16, "logits"),
    ],
)
def test_outputs_on_maia_equal_the_cpus(maia100, name, batch, shape, field):
    cpu, maia = _on_cpu_and_maia(name, batch, shape)
    if field:
        cpu, maia = getattr(cpu, field), getattr(maia, field)
    assert maia.device.type == "maia"
    torch.testing.assert_close(maia.cpu(), cpu)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'yolov9'.*yolov8n.*module:callable"):
        zoo.builtin("yolov9")


def test_image_sides_the_model_cannot_take_are_refused():
    with pytest.raises(ValueError, match="multiple of 32, not 100"):
        zoo.builtin("yolov8n").build(1, 100)
