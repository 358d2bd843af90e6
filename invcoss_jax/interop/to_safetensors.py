"""`python -m invcoss_jax.interop.to_safetensors IN.pth OUT.safetensors [--key model]`

Converts a PyTorch checkpoint (read with `torch.load(weights_only=True)`) to a safetensors state dict once, on
a machine with PyTorch, so that `config.init_from_torch` reads it anywhere without PyTorch.
"""

from __future__ import annotations

import argparse

from invcoss_jax.interop import checkpoint_io


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
  parser.add_argument("src", help="a .pth/.pt/.bin/.ckpt checkpoint")
  parser.add_argument("dst", help="the .safetensors file to write")
  parser.add_argument("--key", default=None, help="entry of a wrapped checkpoint (default: 'model', ...)")
  args = parser.parse_args(argv)
  if not args.dst.endswith(".safetensors"):
    parser.error(f"{args.dst!r}: the output must end in .safetensors")
  state_dict = checkpoint_io.read_state_dict(args.src, key=args.key)
  checkpoint_io.write_safetensors(args.dst, state_dict, metadata={"format": "pt", "converted_from": args.src})
  print(f"wrote {len(state_dict)} tensors to {args.dst}")


if __name__ == "__main__":
  main()
