"""The packed format on its own: bit packing of ±1 factors, the rank rules, and true-bit accounting; and the few-bit
group format of a whole-model embedding (``group_quant``: code packing, quantizer, accounting).

Plain integers and tensors; imports nothing else of hf_littlebit.
"""
