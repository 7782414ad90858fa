"""The command-line pieces TinyVLM's programs share. Standard library only: a program parses its arguments
with these before torch loads, so --help and a mistyped flag answer at once."""

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "eager", "sdpa", "sdpa_varlen", "varlen", "flash_attention_2", "flex_attention")
# model.pick_dtype's rule, for the programs' --dtype
DTYPE_HELP = "auto: bfloat16 on GPUs that have it, else float16; on CPUs bfloat16 with AMX or AVX512-BF16, else float32"


def as_bool(text: str) -> bool | None:
    """True or False for the words a command line uses for them (1/0, true/false, yes/no, on/off), else None."""
    return {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}.get(text.lower())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The programs' --help: their docstring as written, and every option's default."""


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --attn_implementation, as every program that runs a model takes them."""
    parser.add_argument("--device", default="auto", help="auto: cuda, then mps, then cpu")
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    parser.add_argument("--attn_implementation", default="auto", help="auto: sdpa on GPUs, eager on CPUs")


def exit_if_problems(program: str, problems: list[str]) -> None:
    """A program's settings problems, all of them, one line each, then exit status 2 (argparse's)."""
    if problems:
        print("\n".join(f"{program}: error: {problem}" for problem in problems), file=sys.stderr)
        sys.exit(2)


def expandable_segments(environ) -> None:
    """CUDA's caching allocator with segments that grow (expandable_segments), unless its settings were given:
    every training step's shapes differ, and fixed-size segments then fragment the card's memory."""
    if "PYTORCH_ALLOC_CONF" not in environ and "PYTORCH_CUDA_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
