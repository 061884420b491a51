"""The packed format on its own: bit packing of ±1 factors, the rank rules, and true-bit accounting.

Plain integers and tensors; imports nothing else of hf_littlebit.
"""
