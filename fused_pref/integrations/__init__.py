"""Adapters to training code: ``hf`` (Hugging Face transformers causal LMs) and ``trl`` (TRL's DPO
and CPO/SimPO trainers).  Each imports its framework only when imported itself, so ``fused_pref``
keeps no dependency on them (from a clone: ``pip install -e ".[hf]"`` / ``".[trl]"``)."""
