"""The ``littlebit`` command (``python -m hf_littlebit``): argument parser, subcommands and entry point.

The top of the house: may import anything of hf_littlebit; nothing imports it.
"""
