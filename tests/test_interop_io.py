"""Reading PyTorch checkpoints: safetensors without PyTorch, safe `.pth` unpickling, wrappers, dtypes, errors."""

import argparse
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file as torch_save_safetensors  # noqa: E402

from invcoss_jax.interop import checkpoint_io, to_safetensors  # noqa: E402


class NotAllowed:  # pickled by reference: weights_only loading must refuse it
  pass


def _sd():
  g = torch.Generator().manual_seed(0)
  return {"cls_token": torch.randn(1, 1, 8, generator=g), "blocks.0.norm1.weight": torch.randn(8, generator=g),
          "step": torch.tensor(7)}


def test_safetensors_are_read_without_torch(tmp_path, monkeypatch):
  sd = _sd()
  path = tmp_path / "w.safetensors"
  torch_save_safetensors(sd, str(path))
  torch.save(sd, tmp_path / "w.pth")
  expected = {k: v.numpy() for k, v in sd.items()}
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  got = checkpoint_io.read_state_dict(path)
  assert set(got) == set(sd)
  np.testing.assert_array_equal(got["cls_token"], expected["cls_token"])
  assert got["cls_token"].dtype == np.float32 and got["step"].dtype == np.int64
  with pytest.raises(ImportError, match="w.pth.*needs PyTorch.*to_safetensors"):
    checkpoint_io.read_state_dict(tmp_path / "w.pth")


def test_half_precision_checkpoints_come_back_as_float32(tmp_path):
  sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _sd().items()}
  sd["half"] = torch.linspace(-1, 1, 5).to(torch.float16)
  torch_save_safetensors(sd, str(tmp_path / "bf16.safetensors"))
  torch.save(sd, tmp_path / "bf16.pth")
  for name in ("bf16.safetensors", "bf16.pth"):
    got = checkpoint_io.read_state_dict(tmp_path / name)
    assert got["cls_token"].dtype == np.float32 and got["half"].dtype == np.float32
    np.testing.assert_array_equal(got["cls_token"], sd["cls_token"].float().numpy())
    np.testing.assert_array_equal(got["half"], sd["half"].float().numpy())


def test_training_wrappers_and_ddp_prefix_are_removed(tmp_path):
  sd = _sd()
  ddp = {"module." + k: v for k, v in sd.items()}
  torch.save({"model": ddp, "teacher_model": {"x": torch.zeros(1)}, "epoch": 3,
              "args": argparse.Namespace(lr=1e-3)}, tmp_path / "ckpt.pth")
  got = checkpoint_io.read_state_dict(tmp_path / "ckpt.pth")
  assert set(got) == set(sd)
  teacher = checkpoint_io.read_state_dict(tmp_path / "ckpt.pth", key="teacher_model")
  assert set(teacher) == {"x"}
  with pytest.raises(KeyError, match="no entry 'ema'"):
    checkpoint_io.read_state_dict(tmp_path / "ckpt.pth", key="ema")


def test_unsafe_pickles_and_bad_paths_are_refused(tmp_path):
  torch.save({"model": _sd(), "obj": NotAllowed()}, tmp_path / "unsafe.pth")
  with pytest.raises(ValueError, match="unsafe.pth.*cannot be read safely"):
    checkpoint_io.read_state_dict(tmp_path / "unsafe.pth")
  with pytest.raises(FileNotFoundError, match="nope.pth.*does not exist"):
    checkpoint_io.read_state_dict(tmp_path / "nope.pth")
  (tmp_path / "w.onnx").write_bytes(b"x")
  with pytest.raises(ValueError, match="w.onnx.*unknown checkpoint format"):
    checkpoint_io.read_state_dict(tmp_path / "w.onnx")
  torch.save({"epoch": 3, "args": argparse.Namespace()}, tmp_path / "empty.pth")
  with pytest.raises(ValueError, match="empty.pth.*holds no tensors"):
    checkpoint_io.read_state_dict(tmp_path / "empty.pth")


def test_to_safetensors_cli_round_trips(tmp_path, capsys):
  sd = _sd()
  torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, tmp_path / "in.pth")
  to_safetensors.main([str(tmp_path / "in.pth"), str(tmp_path / "out.safetensors")])
  assert "wrote 3 tensors" in capsys.readouterr().out
  got = checkpoint_io.read_state_dict(tmp_path / "out.safetensors")
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k], v.numpy())
  assert checkpoint_io.read_safetensors_metadata(tmp_path / "out.safetensors")["format"] == "pt"
