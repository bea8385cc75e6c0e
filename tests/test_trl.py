"""fused_pref.integrations.trl: a few steps of TRL training on a tiny random Llama and synthetic
preference pairs, on the kernels' device (the GPU, or the CPU with our kernels through the
interpreter), give the losses and metrics of TRL's own trainers from the same seed."""

import contextlib
import copy

import fused_pref
import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from fused_pref.integrations.trl import (FusedCPOTrainer, FusedDPOTrainer, FusedGRPOTrainer,  # noqa: E402
                                         FusedKTOTrainer)
from fused_pref.kernels import tile_plan  # noqa: E402
from fused_pref.testing import kernel_device  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402

V, STEPS = 67, 3
# Compared each step: the loss and every metric our trainers log under TRL's name.  Tolerance:
# fp32 logits summed in another order, then a few optimizer steps on top.
RTOL, ATOL = 2e-4, 1e-5


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>")


def pairs(n=8, seed=0):
    """Prompts of 2-4 tokens; the chosen completion counts up from the prompt's last token, the
    rejected one is random; lengths differ within a pair."""
    gen = torch.Generator().manual_seed(seed)

    def word(i):
        return f"t{3 + i % (V - 3)}"

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        prompt = torch.randint(0, V - 3, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        length = int(torch.randint(2, 6, (1,), generator=gen))
        rows["prompt"].append(" ".join(word(i) for i in prompt))
        rows["chosen"].append(" " + " ".join(word(prompt[-1] + k + 1) for k in range(length)))
        rejected = torch.randint(0, V - 3, (length + 1,), generator=gen).tolist()
        rows["rejected"].append(" " + " ".join(word(i) for i in rejected))
    return datasets.Dataset.from_dict(rows)


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


# bf16=False: TRL's configs default to bf16 autocast, under which both paths run the head in bf16
# and agree only to bf16's resolution; fp32 compares the math at fp32's.  use_cpu only without a GPU:
# with one, it would keep the model on the CPU, where our loss falls back to the reference.
COMMON = dict(bf16=False, per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1, learning_rate=1e-2,
              use_cpu=kernel_device() == "cpu", report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
              dataloader_num_workers=0)


def run(trainer_cls, config, model, dataset=None, **kwargs):
    trainer = trainer_cls(model=model, args=config, train_dataset=pairs() if dataset is None else dataset,
                          processing_class=tokenizer(), **kwargs)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_logs(ours, theirs, skip=(), required=("rewards/accuracies", "logps/chosen")):
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs)):
        compared = [k for k in a if k not in ("learning_rate", "epoch", "step", "grad_norm") and k not in skip]
        assert set(required) <= set(compared)
        for key in compared:
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), f"step {step}: {key}: {a[key]} vs {b[key]}"
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), f"step {step}: grad_norm"


# The gradient-in-forward mode through the trainers' fused_options: a small workspace cuts pairs.
IN_FORWARD = {"backward": "in_forward", "workspace_bytes": 4 * V * 6}


def calls_of(monkeypatch, module, name, what=lambda args, kwargs: args):
    """``what(args, kwargs)`` of each call of ``module.name``, as the calls happen."""
    calls, real = [], getattr(module, name)

    def recorded(*args, **kwargs):
        calls.append(what(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return calls


def blocks_of_pairs(monkeypatch):
    """The head of each call of the gradient-in-forward mode's pair loss."""
    return calls_of(monkeypatch, fused_pref.ops, "preference_and_gradients", lambda args, kwargs: kwargs["head"])


def forward_plans(monkeypatch):
    """The tile plan of each forward of the default path."""
    return calls_of(monkeypatch, fused_pref.ops, "linear_lse_forward", lambda args, kwargs: kwargs["plan"])


def call_options(monkeypatch):
    """The ``Options`` of each default-path call of the fused functions."""
    return calls_of(monkeypatch, fused_pref.functional, "_token_logprobs", lambda args, kwargs: args[4])


# Every fused call without validation's host reads, in small workspaces: the loss's and the passes'
# without gradients.
UNVALIDATED = {"validate": False, "workspace_bytes": 4 * V * 16}


def assert_every_call_took(options, fused_options):
    """Each of ``options`` holds ``fused_options``' validate, workspace_bytes and plan."""
    assert options
    for name in ("validate", "workspace_bytes", "plan"):
        if name in (fused_options or {}):
            assert {getattr(o, name) for o in options} == {fused_options[name]}, name


@pytest.mark.parametrize("loss_type, fused_options, plan", [
    (["sigmoid"], None, None), (["ipo", "sft"], None, None), (["bco_pair"], None, None),
    (["sigmoid"], IN_FORWARD, None), (["ipo", "sft"], IN_FORWARD, None), (["sigmoid"], None, "cublas"),
    (["sigmoid"], UNVALIDATED, None),
], ids=["sigmoid", "ipo+sft", "bco_pair", "sigmoid-in_forward", "ipo+sft-in_forward", "sigmoid-cublas",
        "sigmoid-unvalidated"])
def test_dpo_trainer_matches_trl(loss_type, fused_options, plan, tmp_path, monkeypatch):
    config = trl.DPOConfig(output_dir=str(tmp_path), beta=0.5, loss_type=loss_type, **COMMON)
    model = tiny_llama()
    theirs = run(trl.DPOTrainer, config, copy.deepcopy(model), ref_model=copy.deepcopy(model))
    in_forward, plans, options = blocks_of_pairs(monkeypatch), forward_plans(monkeypatch), call_options(monkeypatch)
    reference_blocks = calls_of(monkeypatch, fused_pref.ops, "logprobs_in_blocks")
    with contextlib.nullcontext() if plan is None else tile_plan(plan):
        ours = run(FusedDPOTrainer, config, copy.deepcopy(model), ref_model=copy.deepcopy(model),
                   fused_options=fused_options)
    assert len(in_forward) == (STEPS if fused_options is IN_FORWARD else 0)
    # The options reach the reference model's pass too: under the gradient-in-forward mode it runs
    # that mode's products (the only default-path calls left are none), else the default path.
    if fused_options is IN_FORWARD:
        assert len(reference_blocks) == STEPS and not options
    else:
        assert not reference_blocks
        assert_every_call_took(options, fused_options)
    # Under "cublas" every call runs it: the loss with its token metrics, and the reference pass.
    if plan is not None:
        assert plans and set(plans) == {plan}
    assert ours[0].keys() == theirs[0].keys() and {"entropy", "mean_token_accuracy"} <= ours[0].keys()
    assert_same_logs(ours, theirs)
    assert ours[-1]["loss"] != ours[0]["loss"]    # it trained


@pytest.mark.parametrize("loss_type, cpo_alpha, fused_options", [("sigmoid", 1.0, None), ("simpo", 0.5, None),
                                                                  ("simpo", 0.5, IN_FORWARD)],
                         ids=["cpo", "cpo-simpo", "cpo-simpo-in_forward"])
def test_cpo_trainer_matches_trl(loss_type, cpo_alpha, fused_options, tmp_path, monkeypatch):
    config = CPOConfig(output_dir=str(tmp_path), loss_type=loss_type, cpo_alpha=cpo_alpha, beta=2.0,
                       simpo_gamma=0.5, max_length=32, **COMMON)
    model = tiny_llama()
    theirs = run(CPOTrainer, config, copy.deepcopy(model))
    in_forward = blocks_of_pairs(monkeypatch)
    ours = run(FusedCPOTrainer, config, copy.deepcopy(model), fused_options=fused_options)
    assert len(in_forward) == (STEPS if fused_options else 0)
    assert ours[0].keys() == theirs[0].keys()
    # CPOTrainer's logits/* averages over every position (prompt, padding) of the full logits.
    assert_same_logs(ours, theirs, skip=("logits/chosen", "logits/rejected"))


@pytest.mark.parametrize("loss_type, hyper, message", [
    ("sigmoid", dict(label_smoothing=0.6), r"^label_smoothing must be in \[0, 0.5\], got 0.6$"),
    ("simpo", dict(beta=0.0), r"^beta must be a positive number, got 0.0$"),
], ids=["cpo-smoothing", "cpo-simpo-beta"])
def test_cpo_values_our_losses_refuse_are_refused_when_the_trainer_is_built(loss_type, hyper, message, tmp_path):
    config = CPOConfig(output_dir=str(tmp_path), loss_type=loss_type, max_length=32, **{**COMMON, **hyper})
    with pytest.raises(ValueError, match=message):
        FusedCPOTrainer(model=tiny_llama(), args=config, processing_class=tokenizer(), train_dataset=pairs())


@pytest.mark.parametrize("loss_type, precompute, plan, fused_options", [
    ("kto", False, None, None), ("apo_zero_unpaired", False, None, None), ("kto", True, None, None),
    ("apo_zero_unpaired", True, None, None), ("kto", False, "cublas", None), ("kto", False, None, UNVALIDATED),
    ("kto", False, None, {"plan": "cublas"})],
    ids=["ref_model-kto", "ref_model-apo_zero_unpaired", "precomputed-kto", "precomputed-apo_zero_unpaired",
         "ref_model-kto-cublas", "ref_model-kto-unvalidated", "ref_model-kto-plan_option"])
def test_kto_trainer_matches_trl(loss_type, precompute, plan, fused_options, tmp_path, monkeypatch):
    # Unpaired: each pair's chosen completion desirable, its rejected one undesirable, shuffled so
    # that batches hold both; KTO's KL completions need the sequential sampler.
    dataset = trl.data_utils.unpair_preference_dataset(pairs(n=6)).shuffle(seed=1)
    config = trl.KTOConfig(output_dir=str(tmp_path), beta=0.5, loss_type=loss_type, desirable_weight=1.2,
                           undesirable_weight=0.9, train_sampling_strategy="sequential",
                           precompute_ref_log_probs=precompute, **COMMON)
    model = tiny_llama()
    theirs = run(trl.KTOTrainer, config, copy.deepcopy(model), dataset, ref_model=copy.deepcopy(model))
    plans, options = forward_plans(monkeypatch), call_options(monkeypatch)
    with contextlib.nullcontext() if plan is None else tile_plan(plan):
        ours = run(FusedKTOTrainer, config, copy.deepcopy(model), dataset, ref_model=copy.deepcopy(model),
                   fused_options=fused_options)
    # The options reach the reference model's and the KL completions' passes too.
    assert_every_call_took(options, fused_options)
    # Under "cublas" every call runs it: the loss with its token metrics, the KL and reference passes.
    plan = plan or (fused_options or {}).get("plan")
    if plan is not None:
        assert plans and set(plans) == {plan}
    assert ours[0].keys() == theirs[0].keys() and {"kl", "entropy", "rewards/margins"} <= ours[0].keys()
    assert_same_logs(ours, theirs, required=("rewards/chosen", "logps/chosen"))
    assert ours[-1]["loss"] != ours[0]["loss"]    # it trained


def _completion_reward(completions, **kwargs):
    # Rewards that differ within a group, so the advantages (and the loss's gradient) are not zero.
    return [float(len(c.split())) + 0.1 * sum(int(w[1:]) % 3 for w in c.split() if w[1:].isdigit())
            for c in completions]


@pytest.mark.parametrize("loss_type, beta, temperature, logged, plan", [
    ("dapo", 0.0, 1.0, "clip_ratio/region_mean", None), ("grpo", 0.2, 0.7, "kl", None),
    ("sapo", 0.0, 0.9, "entropy", None), ("grpo", 0.2, 0.7, "kl", "cublas")],
    ids=["dapo", "grpo+kl+temperature", "sapo", "grpo+kl+temperature-cublas"])
def test_grpo_trainer_matches_trl(loss_type, beta, temperature, logged, plan, tmp_path, monkeypatch):
    # num_iterations=2: the second pass over a generation has old log-probs, so ratios leave 1 and
    # the clipping metrics are exercised.
    config = trl.GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=beta, temperature=temperature,
                            num_generations=4, max_completion_length=6, num_iterations=2, epsilon_high=0.28,
                            **{**COMMON, "per_device_train_batch_size": 8})
    prompts = pairs(n=8).select_columns(["prompt"])
    # A saved model: with beta, GRPOTrainer loads its reference model from the policy's path.
    model = str(tmp_path / "tiny-llama")
    tiny_llama().save_pretrained(model)
    theirs = run(trl.GRPOTrainer, config, model, prompts, reward_funcs=_completion_reward)
    calls = []
    scored = fused_pref.linear_logprobs

    def counted(*args, **kwargs):
        calls.append(kwargs["temperature"])
        return scored(*args, **kwargs)

    monkeypatch.setattr(fused_pref, "linear_logprobs", counted)
    plans = forward_plans(monkeypatch)
    with contextlib.nullcontext() if plan is None else tile_plan(plan):
        ours = run(FusedGRPOTrainer, config, model, prompts, reward_funcs=_completion_reward)
    # Under "cublas" every call runs it: the policy's with its entropy, the old policy's, the reference's.
    if plan is not None:
        assert plans and set(plans) == {plan}
    # Every log-prob came through our kernels: the policy's each step, the old policy's and (with
    # beta) the reference's once per generation.
    assert len(calls) >= STEPS and set(calls) == {temperature}
    assert ours[0].keys() == theirs[0].keys()
    assert_same_logs(ours, theirs, skip=("step_time",), required=("loss", "entropy", logged))
    assert ours[-1]["loss"] != ours[0]["loss"]


def test_unsupported_options_are_refused(tmp_path):
    config = trl.DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "bco_pair"], **COMMON)
    model = tiny_llama()
    with pytest.raises(NotImplementedError, match="one preference loss type"):
        run(FusedDPOTrainer, config, model, ref_model=copy.deepcopy(model))


@pytest.mark.parametrize("trainer, options, error, message", [
    ("dpo", {"shift": False}, TypeError,
     r"^fused_options takes backward, plan, workspace_bytes, validate, got 'shift'$"),
    ("dpo", {"backward": "fast"}, ValueError, r"^backward must be one of .*'fast'"),
    ("kto", {"backward": "in_forward"}, ValueError,
     r"^FusedKTOTrainer's loss does not run with backward='in_forward' \(its gradients need the whole batch\): "
     r"use backward='auto'$"),
    ("dpo-aot", {"backward": "in_forward"}, ValueError,
     r"^FusedDPOTrainer's loss does not run with backward='in_forward' \(its gradients need the whole batch\)"),
    ("grpo", {"backward": "in_forward"}, ValueError,
     r"^FusedGRPOTrainer's loss does not run with backward='in_forward' \(its gradients need the whole batch\)"),
], ids=["unknown", "bad-value", "kto-in_forward", "dpo-aot", "grpo-in_forward"])
def test_fused_options_are_checked_when_the_trainer_is_built(trainer, options, error, message, tmp_path):
    model = tiny_llama()
    if trainer == "grpo":
        config = trl.GRPOConfig(output_dir=str(tmp_path), num_generations=4, max_completion_length=6,
                                **{**COMMON, "per_device_train_batch_size": 8})
        cls, kwargs = FusedGRPOTrainer, dict(train_dataset=pairs(n=8).select_columns(["prompt"]),
                                             reward_funcs=_completion_reward)
    elif trainer.startswith("dpo"):
        loss_type = ["aot"] if trainer == "dpo-aot" else ["sigmoid"]
        config = trl.DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, **COMMON)
        cls, kwargs = FusedDPOTrainer, dict(train_dataset=pairs(), ref_model=copy.deepcopy(model))
    else:
        config, cls = trl.KTOConfig(output_dir=str(tmp_path), **COMMON), FusedKTOTrainer
        kwargs = dict(train_dataset=trl.data_utils.unpair_preference_dataset(pairs(n=6)),
                      ref_model=copy.deepcopy(model))
    with pytest.raises(error, match=message):
        cls(model=model, args=config, processing_class=tokenizer(), fused_options=options, **kwargs)
