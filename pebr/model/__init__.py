"""The policy: a Qwen2(.5)-VL model with its tokenizer and image encoder, and its forward passes.

policy.py          Policy; prompts to tensors; load a folder or build the tiny default
tokenizer.py       the tiny policy's tokenizer and chat template
image_encoder.py   images to the vision tower's pixel rows (engine.ops)
context_limits.py  which items fit the model's positions
forward.py         image features, response log-probs through the fused LM head
shared_prefix.py   a group's prompt once, its n responses against the prompt's keys/values
hf_compat.py       every use of transformers' internals, with the versions checked
"""
