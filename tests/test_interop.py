"""``nlref.interop.torch``: layouts, key mapping, checkpoints (weights only), clear errors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nlref

from .conftest import require
from .test_oracle_support import torch_and_testing


def _interop() -> Any:
    require("torch")
    import nlref.interop.torch as interop

    return interop


def _mmcv_cnn() -> Any:
    require("mmcv")
    import mmcv.cnn

    return mmcv.cnn


def test_nlref_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "import nlref, nlref.interop, nlref.testing, nlref.presets\n"
        "cfg = nlref.preset('mmcv', 8)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    nlref.interop.torch\nexcept ImportError:\n    print('no torch: ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no torch: ok" in out.stdout


def test_mmcv_weights_are_mapped_and_squeezed() -> None:
    _, testing = torch_and_testing()
    interop = _interop()
    module = testing.randomize(
        _mmcv_cnn().NonLocal3d(
            6, mode="concatenation", sub_sample=True, norm_cfg=dict(type="BN3d")
        ),
        0,
    )
    cfg, params = interop.from_torch(module)
    assert list(params) == list(nlref.param_shapes(cfg))
    assert all(a.dtype == np.float64 for a in params.values())
    w = module.phi[0].conv.weight.detach().double().numpy()
    assert w.shape == (3, 6, 1, 1, 1)
    np.testing.assert_array_equal(params["phi.weight"], w[..., 0, 0, 0])
    concat = module.concat_project.conv.weight.detach().double().numpy()
    np.testing.assert_array_equal(params["concat.weight"], concat.reshape(-1))
    np.testing.assert_array_equal(
        params["bn.running_var"], module.conv_out.bn.running_var.double().numpy()
    )
    assert "z.bias" not in params  # mmcv: no conv_out bias before a norm


@pytest.mark.parametrize("layout", ["mmcv", "alexhex7"])
def test_to_state_dict_round_trip_loads_strictly(layout: str) -> None:
    torch_and_testing()
    interop = _interop()
    if layout == "mmcv":
        module = _mmcv_cnn().NonLocal2d(
            6, mode="embedded_gaussian", sub_sample=True, norm_cfg=dict(type="BN")
        )
    else:
        from .test_oracle_alexhex7 import _block

        module = _block("concatenation", 1, False, "bn_train")
    module = module.double()  # float64 values survive the round trip exactly
    cfg, _ = interop.from_torch(module)
    params = nlref.init_params(cfg, rng=3, scheme="random")
    module.load_state_dict(interop.to_state_dict(cfg, params, layout, dims=cfg_dims(module)))
    cfg2, params2 = interop.from_torch(module)
    assert cfg2 == cfg
    for name in params:
        np.testing.assert_array_equal(params2[name], params[name], err_msg=name)


def cfg_dims(module: Any) -> int:
    return next(p for n, p in module.named_parameters() if n.startswith("g.")).dim() - 2


def test_checkpoint_files_load_weights_only(tmp_path: Path) -> None:
    torch, testing = torch_and_testing()
    interop = _interop()
    module = testing.randomize(_mmcv_cnn().NonLocal2d(8, mode="dot_product"), 1)
    cfg, params = interop.from_torch(module)
    # a block inside a larger model, in an mmengine-style checkpoint
    inner = {f"backbone.layer3.1.nl.{k}": v for k, v in module.state_dict().items()}
    inner["backbone.stem.weight"] = torch.zeros(3)
    path = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": inner}, path)
    cfg2, params2 = interop.from_state_dict(
        path, "mmcv", prefix="backbone.layer3.1.nl.", pairwise="dot_product"
    )
    assert cfg2 == cfg
    assert all(np.array_equal(params[k], params2[k]) for k in params)
    with pytest.raises(ValueError, match="no key of the state_dict starts with prefix"):
        interop.from_state_dict(path, "mmcv", prefix="neck.")


def test_safetensors_checkpoint(tmp_path: Path) -> None:
    torch_and_testing()
    interop = _interop()
    import safetensors.torch as safetensors_torch  # in the test extra: missing is a failure

    from .test_oracle_alexhex7 import _block

    module = _block("gaussian", 2, True, "bn_eval")
    path = tmp_path / "nl.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    cfg, params = interop.from_state_dict(path)
    assert cfg.pairwise == "gaussian" and cfg.sub_sample == (2, 2)
    assert set(params) == set(nlref.param_shapes(cfg))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch_and_testing()
    interop = _interop()
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"g.weight": Exploit()}))
    with pytest.raises(ValueError, match=r"cannot load checkpoint .*evil\.pth .*UnpicklingError"):
        interop.from_state_dict(path)
    assert not marker.exists()  # nothing was executed


def test_unrecognised_module_lists_the_layouts() -> None:
    torch, _ = torch_and_testing()
    interop = _interop()
    with pytest.raises(TypeError, match=r"does not recognise .*Conv2d(.|\n)*mmcv(.|\n)*timm"):
        interop.from_torch(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        interop.from_torch({"g.weight": 1})
    with pytest.raises(ValueError, match=r"cannot tell the layout(.|\n)*pytorchvideo"):
        interop.from_state_dict({"conv1.weight": torch.zeros(3, 3, 1, 1)})
    with pytest.raises(ValueError, match="unknown layout 'keras'"):
        interop.from_state_dict({"g.weight": torch.zeros(1)}, "keras")


def test_mismatched_keys_are_named() -> None:
    torch_and_testing()
    interop = _interop()
    sd = _mmcv_cnn().NonLocal2d(8, mode="gaussian", sub_sample=True).state_dict()
    with pytest.raises(ValueError, match=r"missing \['g.conv.bias', 'g.conv.weight'\]"):
        interop.from_state_dict(sd, sub_sample=None)
    sd = dict(sd)
    sd["extra.weight"] = sd["g.0.conv.weight"]
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        interop.from_state_dict(sd, "mmcv")


def test_what_nlref_does_not_model_is_refused() -> None:
    torch, _ = torch_and_testing()
    interop = _interop()
    mmcv_cnn = _mmcv_cnn()
    gn = mmcv_cnn.NonLocal2d(8, norm_cfg=dict(type="GN", num_groups=2))
    with pytest.raises(ValueError, match="only norm is batch norm"):
        interop.from_torch(gn)
    pooled = mmcv_cnn.NonLocal2d(8, sub_sample=True)
    pooled.g[1].ceil_mode = True
    with pytest.raises(ValueError, match="kernel = stride, no padding"):
        interop.from_torch(pooled)
    wide = mmcv_cnn.NonLocal2d(8)
    wide.theta.conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"layer 'theta\.conv' .* 1×1 convs"):
        interop.from_torch(wide)


def test_dtypes() -> None:
    torch_and_testing()
    interop = _interop()
    sd = _mmcv_cnn().NonLocal1d(4, mode="gaussian").state_dict()
    _, p32 = interop.from_state_dict(sd, dtype=None)
    assert p32["g.weight"].dtype == np.float32
    _, p16 = interop.from_state_dict({k: v.half() for k, v in sd.items()}, dtype=None)
    assert p16["g.weight"].dtype == np.float32
    _, p64 = interop.from_state_dict({k: v.numpy() for k, v in sd.items()})  # NumPy values
    assert p64["g.weight"].dtype == np.float64
    with pytest.raises(ValueError, match="dtype must be"):
        interop.from_state_dict(sd, dtype="int8")


def test_key_map_and_layout_detection() -> None:
    interop = _interop()
    cfg = nlref.preset("alexhex7", 8, dims=2, norm=None, pairwise="concatenation")
    assert interop.key_map("alexhex7", cfg) == {
        "theta.weight": "theta.weight",
        "theta.bias": "theta.bias",
        "phi.weight": "phi.0.weight",
        "phi.bias": "phi.0.bias",
        "g.weight": "g.0.weight",
        "g.bias": "g.0.bias",
        "concat.weight": "concat_project.0.weight",
        "z.weight": "W.weight",
        "z.bias": "W.bias",
    }
    assert interop.detect_layout(["t.weight", "p.weight", "g.weight", "z.weight"]) == "timm"
    assert interop.detect_layout(["conv_theta.weight", "conv_g.weight", "conv_out.weight"]) == (
        "pytorchvideo"
    )
