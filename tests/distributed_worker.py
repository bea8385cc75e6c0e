"""Run by tests/test_distributed.py under torchrun (gloo, CPU, kernels under the interpreter).

    [FUSED_PREF_WORKER_DEVICE=cuda] torchrun --standalone --nproc-per-node W tests/distributed_worker.py \
        CHECK...

    CHECK: vocab-chunk | vocab-split | vocab-stats | vocab-compile | vocab-inforward | dtensor | ddp | fsdp
         | hf-fsdp[-bf16][-head][-offload] | hf-zero3 | zero3-direct | trl-fsdp[-head] | trl-zero3
         | trl-dtensor | grpo-fsdp | grpo-zero3 | grpo-dtensor

Each check raises on a mismatch (non-zero exit) and rank 0 prints one "ok <check>" line.
"""

import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fused_pref  # noqa: E402
from fused_pref.testing import TOLERANCE, as_reference, count_host_reads, make_inputs, relative_error  # noqa: E402

# The hf-fsdp checks also run on GPUs (NCCL, FUSED_PREF_WORKER_DEVICE=cuda): FSDP2's CPU offload needs
# an accelerator.  Every other check is CPU-only.
DEVICE = os.environ.get("FUSED_PREF_WORKER_DEVICE", "cpu")
SHAPE = (4, 23, 97, 1003)  # V = 1003 is divisible by neither 2 nor 3


def _close(ours, theirs, what):
    error = relative_error(ours, theirs)
    assert error <= TOLERANCE[torch.float32], f"rank {dist.get_rank()}: {what}: relative error {error:.2e}"


LOSSES = {
    "simpo": lambda m, x, **kw: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], **kw).loss,
    "dpo": lambda m, x, **kw: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], shift=True,
                                         ref_hidden=x["hidden"].detach().flip(0), loss_type="ipo", **kw).loss,
    "cross_entropy": lambda m, x, **kw: m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                               softcap=20.0, **kw),
}


def vocab_parallel(split):
    """Each rank holds a vocabulary shard; results and gradients equal the unsharded reference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    V = SHAPE[3]
    if split == "chunk":  # equal shards, the last smaller: the default vocab_start fits
        sizes = [len(c) for c in torch.arange(V).chunk(world)]
    else:  # torch.tensor_split: the first shards larger, vocab_start must be given
        sizes = [len(c) for c in torch.arange(V).tensor_split(world)]
    start = sum(sizes[:rank])
    for name, loss in LOSSES.items():
        full = make_inputs(*SHAPE, seed=5)
        ref = as_reference(full)
        expected = loss(fused_pref.reference, ref)
        expected.backward()
        local = {**full, "weight": full["weight"][start:start + sizes[rank]].detach().clone().requires_grad_(),
                 "bias": full["bias"][start:start + sizes[rank]].detach().clone().requires_grad_()}
        kwargs = {"process_group": dist.group.WORLD}
        if split != "chunk":
            kwargs["vocab_start"] = start
        for module in (fused_pref, fused_pref.reference):
            for t in local.values():
                t.grad = None
            inputs = local if module is fused_pref else as_reference(local)
            got = loss(module, inputs, **kwargs)
            got.backward()
            tag = f"{name}/{module.__name__}"
            _close(got, expected, f"{tag} value")
            _close(inputs["hidden"].grad, ref["hidden"].grad, f"{tag} d_hidden")
            _close(inputs["weight"].grad, ref["weight"].grad[start:start + sizes[rank]], f"{tag} d_weight shard")
            _close(inputs["bias"].grad, ref["bias"].grad[start:start + sizes[rank]], f"{tag} d_bias shard")
        # validate=False promises no host synchronisation, with a sharded vocabulary too.
        with count_host_reads() as reads:
            loss(fused_pref, local, validate=False, **kwargs).backward()
        assert not reads, f"rank {rank}: {name}: host reads with validate=False: {dict(reads)}"


def vocab_parallel_statistics(plan):
    """In tile plan ``plan``, the per-token statistics (entropy, argmax, token accuracy; a preference
    loss's and KTO's TRL metrics; GRPO's entropy bonus and mask) and cross-entropy's z-loss and label
    smoothing (class-weighted, and under a softcap), each rank holding a vocabulary shard, validated
    and not: values, argmaxes and gradients equal the unsharded reference.  Column 3 (rank 0's) is copied to column V - 5 (the
    last rank's) and tokens point at it: their max ties across shards (checked: both ranks' kernels
    give the same max logit), and the argmax must be the first column, 3, as torch.argmax's."""
    from fused_pref.kernels import linear_lse_forward, tile_plan

    rank, world = dist.get_rank(), dist.get_world_size()
    R, T, D, V = SHAPE
    sizes = [len(c) for c in torch.arange(V).chunk(world)]
    start, tied = sum(sizes[:rank]), V - 5
    full = make_inputs(*SHAPE, seed=9)
    with torch.no_grad():
        # The tied rows' entries on a grid of 1/4 and the pointing hidden states 1/8 of them: every
        # product and partial sum of the tied logits is exact in fp32 and fp64, so they tie in any
        # summation order (a CPU's fp64 matmul may sum its last columns in another order, which
        # broke the tie in the reference on some machines).  Logit |row|^2 / 8 ~ 7.8 (plus the
        # bias), the max by far; no larger, where fp32's error in a logit of 30 made GRPO's d_weight
        # (one weight per sequence) miss fp64's by 1e-5.
        row = (full["weight"][3] * 3.2).round() / 4
        full["weight"][3] = full["weight"][tied] = row
        full["bias"][tied] = full["bias"][3]
        full["hidden"][:, 5:9] = row / 8
    full["labels"][:, 5:7] = tied
    full["labels"][:, 7:9] = 3
    gen = torch.Generator().manual_seed(4)
    scale = torch.randn(2, R, T, generator=gen)
    classes = torch.rand(V, generator=gen) + 0.5
    advantages = torch.randn(R, generator=gen)
    desirable = torch.tensor([True, False, True, True])
    mine = slice(start, start + sizes[rank])

    # The tie is one in the kernels' own fp32 logits: rank 0's column 3 and the last rank's V - 5.
    n = R * T
    *_, max_logit = linear_lse_forward(full["hidden"].detach(), full["weight"][mine].detach(),
                                       full["bias"][mine].detach(), torch.zeros(n, dtype=torch.int64),
                                       torch.arange(n, dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                                       softcap=30.0, token_stats=True, plan=plan)
    pointed = max_logit.view(R, T)[:, 5:9].contiguous()
    every = [torch.empty_like(pointed) for _ in range(world)]
    dist.all_gather(every, pointed)
    assert torch.equal(every[0], every[-1]), f"rank {rank}: the max logits at columns 3 and {tied} differ"

    def statistics(m, x, **kw):
        out = m.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], return_entropy=True,
                                return_token_accuracy=True, return_argmax=True, softcap=30.0, **kw)
        loss = (out.logp * scale[0].to(out.logp)).sum() + (out.entropy * scale[1].to(out.entropy)).sum()
        return loss, {"entropy": out.entropy, "argmax": out.argmax, "token_accuracy": out.token_accuracy}

    def cross_entropy(m, x, **kw):
        out = m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], label_smoothing=0.1,
                                     ce_weight=classes.to(x["hidden"].dtype), lse_square_scale=1e-2,
                                     return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True,
                                     **kw)
        return out.loss, {"z_loss": out.z_loss, "token_accuracy": out.token_accuracy,
                          "predicted_tokens": out.predicted_tokens}

    def smoothed_under_softcap(m, x, **kw):
        # The tiles sum the soft-capped logits (the sum of a plain head comes from a column sum).
        return m.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], x["bias"], label_smoothing=0.2,
                                      softcap=20.0, reduction="sum", **kw), {}

    def simpo(m, x, **kw):
        out = m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], token_metrics=True, **kw)
        return out.loss, {name: getattr(out, name) for name in ("entropy", "mean_token_accuracy", "chosen_logps",
                                                                 "rejected_logps", "chosen_logits_mean")}

    # The mask's threshold halfway between the 7th and 8th lowest of the 41 entropies, away from every
    # token's: at a quantile that is a token's own entropy (0.5 here is the 16 tied tokens'), which
    # side each lands on turns on fp32 rounding that differs with a row's place in a tile.
    def grpo(m, x, **kw):
        out = m.grpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], advantages=advantages.to(x["hidden"]),
                          loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.8375, **kw)
        return out.loss, {"entropy": out.entropy, "mean entropy": out.stats["entropy"]}

    def kto(m, x, **kw):
        out = m.kto_loss(x["hidden"], x["weight"], x["labels"], x["bias"], desirable=desirable,
                         ref_hidden=x["hidden"].detach().flip(0), kl=0.1, token_metrics=True, **kw)
        return out.loss, {name: getattr(out, name) for name in ("logps", "kl", "logit_sums", "entropy_sums")}

    # Every forward of the fused calls runs ``plan``: each of these losses asks for statistics or
    # per-row weights, which both plans carry.
    plans, forward = [], fused_pref.ops.linear_lse_forward

    def recorded_forward(*args, **kwargs):
        plans.append(kwargs["plan"])
        return forward(*args, **kwargs)

    losses = (("statistics", statistics), ("cross_entropy", cross_entropy),
              ("smoothed_under_softcap", smoothed_under_softcap), ("simpo", simpo), ("grpo", grpo), ("kto", kto))
    for name, loss in losses:
        ref = as_reference(full)
        expected, expected_more = loss(fused_pref.reference, ref)
        expected.backward()
        if "argmax" in expected_more:
            assert (expected_more["argmax"][:, 5:9] == 3).all(), "the reference's argmax is not the first column"
        local = {**full, "weight": full["weight"][mine].detach().clone().requires_grad_(),
                 "bias": full["bias"][mine].detach().clone().requires_grad_()}
        # validate=False: the shard's start and size stay on the device (no host read).
        for module, options in ((fused_pref, {}), (fused_pref, {"validate": False}), (fused_pref.reference, {})):
            for t in local.values():
                t.grad = None
            inputs = local if module is fused_pref else as_reference(local)
            plans.clear()
            fused_pref.ops.linear_lse_forward = recorded_forward
            try:
                with tile_plan(plan):
                    got, more = loss(module, inputs, process_group=dist.group.WORLD, **options)
            finally:
                fused_pref.ops.linear_lse_forward = forward
            assert set(plans) == ({plan} if module is fused_pref else set()), f"rank {rank}: {name}: plans {plans}"
            got.backward()
            tag = f"stats {name}/{module.__name__} {options}"
            _close(got, expected, f"{tag} value")
            for what, value in more.items():
                if value.dtype.is_floating_point:
                    _close(value, expected_more[what], f"{tag} {what}")
                else:
                    assert torch.equal(value, expected_more[what]), f"rank {rank}: {tag} {what}"
            _close(inputs["hidden"].grad, ref["hidden"].grad, f"{tag} d_hidden")
            _close(inputs["weight"].grad, ref["weight"].grad[mine], f"{tag} d_weight shard")
            _close(inputs["bias"].grad, ref["bias"].grad[mine], f"{tag} d_bias shard")
        with count_host_reads() as reads, tile_plan(plan):
            loss(fused_pref, local, validate=False, process_group=dist.group.WORLD)[0].backward()
        assert not reads, f"rank {rank}: {name}: host reads with validate=False: {dict(reads)}"
    # The class weights cover the whole vocabulary, not this rank's shard; without validation only
    # the shard's rows are known without a host read.
    local = {**full, "weight": full["weight"][mine], "bias": None}
    for wrong, validate, message in ((classes[:sizes[rank]], True, f"ce_weight must be [V] = [{V}]"),
                                     (classes[:-1], True, f"ce_weight must be [V] = [{V}]"),
                                     (classes[:sizes[rank] - 1], False, f"fewer than this rank's {sizes[rank]} rows")):
        try:
            fused_pref.linear_cross_entropy(local["hidden"], local["weight"], local["labels"], ce_weight=wrong,
                                            validate=validate, process_group=dist.group.WORLD)
        except ValueError as error:
            assert message in str(error), f"rank {rank}: {error}"
        else:
            raise AssertionError(f"rank {rank}: ce_weight of shape {tuple(wrong.shape)} accepted")


def _sharded_head(full, given, mine):
    """This rank's lm_head weight and bias as leaves, and the keywords that say they are shards:
    rows ``mine`` by hand under ``process_group``, or (``given == "dtensor"``) DTensors sharded on
    the vocabulary over a 1-D mesh of every rank, which bring their own group."""
    if given == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        weight, bias = (distribute_tensor(full[k].detach(), mesh, [Shard(0)]).requires_grad_()
                        for k in ("weight", "bias"))
        return weight, bias, {}
    weight, bias = (full[k][mine].detach().clone().requires_grad_() for k in ("weight", "bias"))
    return weight, bias, {"process_group": dist.group.WORLD}


def vocab_parallel_in_forward():
    """``backward="in_forward"`` on a sharded vocabulary, by hand and as a DTensor lm_head: each block's
    lse merged across the ranks before its ``dz``, ``d_hidden`` summed; values and gradients equal
    the unsharded reference, for cross-entropy (class weights, softcap, temperature), SimPO, DPO with
    a reference model (its log-probs by the same blocks) and a pair loss whose pairs are cut into
    several blocks, validated or not; a reference model's per-sequence log-probs (no gradients);
    and SimPO's token metrics and cross-entropy's predicted tokens."""
    rank, world = dist.get_rank(), dist.get_world_size()
    V = SHAPE[3]
    sizes = [len(c) for c in torch.arange(V).chunk(world)]
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    classes = torch.rand(V, generator=torch.Generator().manual_seed(2)) + 0.5
    losses = {
        "cross_entropy": lambda m, x, **kw: m.linear_cross_entropy(
            x["hidden"], x["weight"], x["labels"], x["bias"], ce_weight=classes.to(x["hidden"].dtype), softcap=20.0,
            temperature=0.7, **kw),
        "simpo": lambda m, x, **kw: m.simpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], sft_weight=0.3,
                                                 **kw).loss,
        "dpo": lambda m, x, **kw: m.dpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"], shift=True,
                                             ref_hidden=x["hidden"].detach().flip(0), **kw).loss,
        # A block holds fewer rows than a pair, so every pair is cut into several; and the shards'
        # own widths would size the blocks unevenly (2 ranks: 15 rows on 502 columns, 16 on 501; 3
        # ranks: 23 and 24): every rank must cut them by the largest shard.
        "cpo (cut pairs)": lambda m, x, **kw: m.cpo_loss(x["hidden"], x["weight"], x["labels"], x["bias"],
                                                         workspace_bytes=64128, **kw).loss,
    }
    for name, loss in losses.items():
        full = make_inputs(*SHAPE, seed=13)
        ref = as_reference(full)
        expected = loss(fused_pref.reference, ref)
        expected.backward()
        for given, validate in (("process_group", True), ("process_group", False), ("dtensor", True)):
            weight, bias, kwargs = _sharded_head(full, given, mine)
            hidden = full["hidden"].detach().clone().requires_grad_()
            got = loss(fused_pref, {"hidden": hidden, "weight": weight, "bias": bias, "labels": full["labels"]},
                       backward="in_forward", validate=validate, **kwargs)
            got.backward()
            tag = f"in_forward {name} ({given}, validate={validate})"
            _close(got, expected, f"{tag} value")
            _close(hidden.grad, ref["hidden"].grad, f"{tag} d_hidden")
            for what, param, reference in (("d_weight", weight, ref["weight"]), ("d_bias", bias, ref["bias"])):
                grad = param.grad.full_tensor() if given == "dtensor" else param.grad
                _close(grad, reference.grad if given == "dtensor" else reference.grad[mine], f"{tag} {what}")

    # A reference model's pass: per-sequence log-probs under no_grad by the mode's first product
    # alone (ops.logprobs_without_gradients), each block's lse merged across the ranks.
    full = make_inputs(*SHAPE, seed=19)
    ref = as_reference(full)
    expected = fused_pref.reference.sequence_logprobs(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                      shift=True)
    calls, logprobs = [], fused_pref.ops.logprobs_without_gradients
    fused_pref.ops.logprobs_without_gradients = lambda *a, **k: calls.append(1) or logprobs(*a, **k)
    try:
        for given, validate in (("process_group", True), ("process_group", False), ("dtensor", True)):
            weight, bias, kwargs = _sharded_head(full, given, mine)
            with torch.no_grad():
                got = fused_pref.sequence_logprobs(full["hidden"], weight, full["labels"], bias, shift=True,
                                                   backward="in_forward", validate=validate, **kwargs)
            _close(got, expected, f"in_forward sequence_logprobs ({given}, validate={validate})")
    finally:
        fused_pref.ops.logprobs_without_gradients = logprobs
    assert len(calls) == 3, f"rank {rank}: the mode's products ran {len(calls)} times, not 3"

    # TRL's token metrics (entropy, mean token accuracy) from each shard's first pass, merged across
    # the ranks: the unsharded reference's, with whole pairs per block and with pairs cut.
    full = make_inputs(*SHAPE, seed=17)
    ref = as_reference(full)
    expected = fused_pref.reference.simpo_loss(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                               token_metrics=True).metrics()
    assert expected["mean_token_accuracy"] > 0
    predicted = fused_pref.reference.linear_cross_entropy(ref["hidden"], ref["weight"], ref["labels"], ref["bias"],
                                                          return_predicted_tokens=True).predicted_tokens
    for given, validate in (("process_group", True), ("process_group", False), ("dtensor", True)):
        weight, bias, kwargs = _sharded_head(full, given, mine)
        for workspace in ({}, {"workspace_bytes": 64128}):
            got = fused_pref.simpo_loss(full["hidden"], weight, full["labels"], bias, token_metrics=True,
                                        backward="in_forward", validate=validate, **workspace, **kwargs).metrics()
            for key in ("entropy", "mean_token_accuracy"):
                assert math.isclose(got[key], expected[key], rel_tol=1e-5), (rank, given, validate, workspace, key,
                                                                             got[key], expected[key])
            # Cross-entropy's predicted tokens: the argmax merged across the shards, the lowest id of a tie.
            ce = fused_pref.linear_cross_entropy(full["hidden"], weight, full["labels"], bias, backward="in_forward",
                                                 return_predicted_tokens=True, validate=validate, **workspace,
                                                 **kwargs)
            assert torch.equal(ce.predicted_tokens, predicted), (rank, given, validate, workspace)


def vocab_parallel_compiled():
    """Vocabulary-parallel losses under ``torch.compile(fullgraph=True)`` (validated: the host reads
    are skipped in the compiled region, as on one device), the shard given by hand and as a DTensor
    lm_head, with the per-token statistics, without, and under ``backward="in_forward"``: values
    and gradients equal the unsharded reference."""
    rank, world = dist.get_rank(), dist.get_world_size()
    V = SHAPE[3]
    sizes = [len(c) for c in torch.arange(V).chunk(world)]
    mine = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    gen = torch.Generator().manual_seed(8)
    scale = torch.randn(SHAPE[0], SHAPE[1], generator=gen)

    def statistics(m, x, **kw):
        out = m.linear_logprobs(x["hidden"], x["weight"], x["labels"], x["bias"], return_entropy=True,
                                return_argmax=True, **kw)
        return (out.logp.sum() + (out.entropy * scale.to(out.entropy)).sum()), out.argmax

    def cross_entropy_in_forward(m, x, **kw):
        # The gradients computed in the forward: the group reaches the custom op by its name.
        return LOSSES["cross_entropy"](m, x, **kw, **({"backward": "in_forward"} if m is fused_pref else {}))

    for name, loss in (("statistics", statistics), ("simpo", LOSSES["simpo"]),
                       ("cross_entropy in_forward", cross_entropy_in_forward)):
        full = make_inputs(*SHAPE, seed=11)
        ref = as_reference(full)
        expected = loss(fused_pref.reference, ref)
        (expected[0] if isinstance(expected, tuple) else expected).backward()
        for given in ("process_group", "dtensor"):
            weight, bias, kwargs = _sharded_head(full, given, mine)
            hidden = full["hidden"].detach().clone().requires_grad_()
            inputs = {"hidden": hidden, "weight": weight, "bias": bias, "labels": full["labels"]}
            torch._dynamo.reset()
            got = torch.compile(lambda x: loss(fused_pref, x, **kwargs), fullgraph=True)(inputs)
            value = got[0] if isinstance(got, tuple) else got
            value.backward()
            tag = f"compiled {name} ({given})"
            _close(value, expected[0] if isinstance(expected, tuple) else expected, f"{tag} value")
            if isinstance(got, tuple):
                if got[1].dtype.is_floating_point:
                    _close(got[1], expected[1], f"{tag} entropy")
                else:
                    assert torch.equal(got[1], expected[1]), f"rank {rank}: {tag} argmax"
            _close(hidden.grad, ref["hidden"].grad, f"{tag} d_hidden")
            for what, param, reference in (("d_weight", weight, ref["weight"]), ("d_bias", bias, ref["bias"])):
                grad = param.grad.full_tensor() if given == "dtensor" else param.grad
                _close(grad, reference.grad if given == "dtensor" else reference.grad[mine], f"{tag} {what}")


def dtensor_parallel():
    """An lm_head split by ``parallelize_module(..., ColwiseParallel())`` (a DTensor weight and bias
    sharded on the vocabulary) straight into every loss, fused and reference: results equal the
    unsharded reference, gradients are DTensors with the parameters' placements whose full tensors
    equal the reference's; a replicated DTensor ``hidden`` gets a replicated gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    R, T, D, V = SHAPE
    for name, loss in LOSSES.items():
        full = make_inputs(*SHAPE, seed=5)
        ref = as_reference(full)
        expected = loss(fused_pref.reference, ref)
        expected.backward()
        for module in (fused_pref, fused_pref.reference):
            head = torch.nn.Linear(D, V)
            with torch.no_grad():
                head.weight.copy_(full["weight"])
                head.bias.copy_(full["bias"])
            parallelize_module(head, mesh, ColwiseParallel())
            assert isinstance(head.weight, DTensor) and head.weight.placements == (Shard(0),)
            hidden = full["hidden"].detach().clone()
            if name == "simpo":
                hidden = distribute_tensor(hidden, mesh, [Replicate()])
            hidden.requires_grad_()
            got = loss(module, {"hidden": hidden, "weight": head.weight, "labels": full["labels"],
                                "bias": head.bias})
            got.backward()
            tag = f"dtensor {name}/{module.__name__}"
            _close(got, expected, f"{tag} value")
            for what, param, reference in (("d_weight", head.weight, ref["weight"]), ("d_bias", head.bias,
                                                                                      ref["bias"])):
                assert isinstance(param.grad, DTensor) and param.grad.placements == (Shard(0),), f"{tag} {what}"
                _close(param.grad.full_tensor(), reference.grad, f"{tag} {what}")
            d_hidden = hidden.grad
            if isinstance(hidden, DTensor):
                assert d_hidden.placements == (Replicate(),), f"{tag} d_hidden placements {d_hidden.placements}"
                d_hidden = d_hidden.to_local()
            _close(d_hidden, ref["hidden"].grad, f"{tag} d_hidden")
    # A transformers model whose lm_head parallelize_module split, through integrations.hf: the
    # ColwiseParallel hooks (which expect logits) are left alone, the loss takes the DTensor weight.
    import transformers

    import fused_pref.integrations.hf as fph

    config, ids, labels = _llama_batch()
    torch.manual_seed(0)
    single = transformers.LlamaForCausalLM(config)
    expected = fph.linear_cross_entropy(single, ids, labels)
    expected.backward()
    torch.manual_seed(0)
    model = parallelize_module(transformers.LlamaForCausalLM(config), mesh, {"lm_head": ColwiseParallel()})
    got = fph.linear_cross_entropy(model, ids, labels)
    got.backward()
    _close(got, expected, "dtensor integrations.hf value")
    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        _close(grad, q.grad, f"dtensor integrations.hf {name}")
    # What is refused, each with its reason.
    x = make_inputs(*SHAPE, seed=6)
    sharded = distribute_tensor(x["weight"].detach(), mesh, [Shard(0)])
    refused = (
        ({"weight": distribute_tensor(x["weight"].detach(), mesh, [Shard(1)])}, "placements"),
        ({"weight": sharded, "bias": x["bias"]}, "weight sharded on the vocabulary (DTensor Shard(0)) but bias not"),
        ({"weight": sharded, "process_group": dist.group.WORLD}, "leave process_group and vocab_start unset"),
        # Each rank's own tokens (as under FSDP, whose sharded weight is such a DTensor too).
        ({"weight": sharded, "hidden": x["hidden"] + dist.get_rank()}, "hidden or labels differ across"),
    )
    # One positional argument too many: the function's own TypeError, not a silently dropped argument.
    try:
        fused_pref.linear_cross_entropy(x["hidden"], sharded, x["labels"], None, "sum")
    except TypeError:
        pass
    else:
        raise AssertionError(f"rank {dist.get_rank()}: a fifth positional argument was accepted")
    for change, message in refused:
        call = {"hidden": x["hidden"], "weight": x["weight"], "labels": x["labels"], "bias": None, **change}
        try:
            fused_pref.linear_cross_entropy(call.pop("hidden"), call.pop("weight"), call.pop("labels"), **call)
        except ValueError as error:
            assert message in str(error), f"rank {dist.get_rank()}: {error}"
        else:
            raise AssertionError(f"rank {dist.get_rank()}: not refused: {message}")
    # Too few vocabulary rows for the ranks: every rank refuses (one alone would leave the others
    # waiting in a collective).
    few = distribute_tensor(x["weight"].detach()[:dist.get_world_size() - 1], mesh, [Shard(0)])
    try:
        fused_pref.linear_cross_entropy(x["hidden"], few, x["labels"].clamp(max=0))
    except ValueError as error:
        assert "leaves a rank without rows" in str(error), f"rank {dist.get_rank()}: {error}"
    else:
        raise AssertionError(f"rank {dist.get_rank()}: a shard without rows was not refused")
    # The same given by hand: rank 0 holds no rows, the other ranks split the vocabulary.
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [0] + [len(c) for c in torch.arange(SHAPE[3]).tensor_split(world - 1)]
    start = sum(sizes[:rank])
    mine = x["weight"].detach()[start:start + sizes[rank]]
    group = {"process_group": dist.group.WORLD, "vocab_start": start}
    advantages = torch.ones(x["labels"].shape[0])
    for module in (fused_pref, fused_pref.reference):
        calls = {
            "linear_cross_entropy": lambda: module.linear_cross_entropy(x["hidden"], mine, x["labels"], **group),
            "dpo_loss": lambda: module.dpo_loss(x["hidden"], mine, x["labels"], ref_hidden=x["hidden"], **group),
            "grpo_loss": lambda: module.grpo_loss(x["hidden"], mine, x["labels"], advantages=advantages, beta=0.1,
                                                  ref_hidden=x["hidden"], **group),
        }
        for name, call in calls.items():
            try:
                call()
            except ValueError as error:
                assert "rank(s) [0] have none" in str(error), f"rank {rank}: {module.__name__}.{name}: {error}"
            else:
                raise AssertionError(f"rank {rank}: {module.__name__}.{name}: a shard without rows given by hand "
                                     "was not refused")

class TinyLM(torch.nn.Module):
    """Embedding, one hidden layer and an lm_head; the loss is computed in forward (as trainers do)."""

    def __init__(self, vocab=301, dim=40):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, labels):
        hidden = torch.tanh(self.mix(self.embed(ids)))
        return fused_pref.simpo_loss(hidden, self.lm_head.weight, labels, shift=True).loss


def _pairs(B=4, T=13, vocab=301):
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (2 * B, T), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def _rank_batch(ids, labels):
    """This rank's pairs, still chosen-first: rows j and j+B for its share of j."""
    rank, world = dist.get_rank(), dist.get_world_size()
    B = ids.shape[0] // 2
    mine = torch.arange(B).chunk(world)[rank]
    rows = torch.cat([mine, mine + B])
    return ids[rows], labels[rows]


def data_parallel(kind):
    """DDP gradients equal the single-process full-batch ones; under FSDP the lm_head gradient does."""
    torch.manual_seed(0)
    single = TinyLM()
    ids, labels = _pairs()
    single(ids, labels).backward()
    torch.manual_seed(0)
    model = TinyLM()
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    model(*_rank_batch(ids, labels)).backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        # FSDP's gradient is a sharded DTensor; both average over ranks, and the ranks' means over
        # equally many pairs average to the full batch's mean.
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        _close(grad, q.grad, f"{kind} {name}")


def _fsdp(model, mesh, wrap):
    """``model`` under FSDP2 as ``wrap`` names: "fsdp" as accelerate and TRL wrap it (every decoder
    layer, then the root, which holds the lm_head), "-bf16" under a bf16 ``MixedPrecisionPolicy``,
    "-head" with the lm_head its own unit (resharded after its forward), "-offload" with every
    parameter on the host between uses (``CPUOffloadPolicy``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if "bf16" in wrap \
        else MixedPrecisionPolicy()
    options = dict(mesh=mesh, mp_policy=policy,
                   offload_policy=CPUOffloadPolicy() if "offload" in wrap else OffloadPolicy())
    for layer in model.model.layers:
        fully_shard(layer, **options)
    if "head" in wrap:
        fully_shard(model.lm_head, reshard_after_forward=True, **options)
    return fully_shard(model, **options)


def _zero3(model):
    """``model`` as DeepSpeed ZeRO-3 runs it: every parameter partitioned across the ranks (none kept
    whole, however small), gathered by the engine's hooks around each module's forward and backward."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    assert engine.module.lm_head.weight.numel() == 0, "the lm_head weight is not partitioned"
    return engine


def hf_sharded(wrap):
    """A transformers Llama under FSDP2 (:func:`_fsdp`) or DeepSpeed ZeRO-3 (:func:`_zero3`), our loss
    through its forward (``integrations.hf.add_fused_forward``, as the TRL trainers call it): each
    rank's share of the batch, and the loss and every parameter's gradient equal the single-process
    full batch's (fp32), or to bf16's resolution under a bf16 policy."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import fused_pref.integrations.hf as fph

    config, ids, labels = _llama_batch()
    ids, labels = ids.to(DEVICE), labels.to(DEVICE)

    def loss_of(model, ids, labels):
        return model(input_ids=ids, fused_pref=lambda h, head: head.apply(fused_pref.linear_cross_entropy, h, labels))

    torch.manual_seed(0)
    single = fph.add_fused_forward(transformers.LlamaForCausalLM(config)).to(DEVICE)
    expected = loss_of(single, ids, labels)
    expected.backward()
    torch.manual_seed(0)
    model = fph.add_fused_forward(transformers.LlamaForCausalLM(config)).to(DEVICE)
    if wrap == "zero3":
        model = _zero3(model)
    else:
        model = _fsdp(model, init_device_mesh(DEVICE, (dist.get_world_size(),)), wrap)
    rows = _rows()
    got = loss_of(model, ids[rows], labels[rows])
    if wrap == "zero3":
        model.backward(got)
    else:
        got.backward()
    _same_as_single(f"hf-{wrap}", model, got, single, expected,
                    TOLERANCE[torch.bfloat16 if "bf16" in wrap else torch.float32])
    if wrap != "zero3":
        # Outside the model's forward its root's parameters stay sharded: refused with the way in.
        for call in (lambda: fph.linear_cross_entropy(model, ids[rows], labels[rows]),
                     lambda: fph.dpo_loss(single, ids[rows], labels[rows], ref_model=model),
                     lambda: fph.hidden_states(model, ids[rows])):
            try:
                call()
            except ValueError as error:
                assert "add_fused_forward" in str(error), f"hf-{wrap}: {error}"
            else:
                raise AssertionError(f"hf-{wrap}: a call outside the FSDP root's forward was not refused")


def _llama_batch():
    """A tiny transformers Llama config, and a batch of two rows per rank with the same number of
    valid labels in every row (so the mean of the ranks' mean losses is the full batch's)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 301, (2 * dist.get_world_size(), 11), generator=gen)
    return config, ids, ids.masked_fill(torch.arange(11) < 3, -100)


def _rows():
    world = dist.get_world_size()
    return torch.arange(2 * world).chunk(world)[dist.get_rank()]


def _tensor_parallel_head(model):
    """``model`` with its lm_head split on the vocabulary by ``parallelize_module(..., ColwiseParallel())``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})


def _full(grad):
    """The whole gradient from FSDP's sharded one (or tensor parallelism's; a plain tensor as it is).
    Under CPU offload the shards are on the host, which NCCL cannot gather: they go to the GPU first."""
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor):
        return grad
    if grad.device.type == "cpu" and DEVICE == "cuda":
        grad = DTensor.from_local(grad.to_local().to(DEVICE), grad.device_mesh, grad.placements, run_check=False,
                                  shape=grad.shape, stride=grad.stride())
    return grad.full_tensor()


def _same_as_single(tag, model, got, single, expected, tolerance=TOLERANCE[torch.float32]):
    """This rank's loss ``got`` (its backward done) on its rows, and the gradients of the wrapped
    ``model`` (an FSDP2 module or a DeepSpeed engine), against the single process's full batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if hasattr(model, "backward"):     # a DeepSpeed engine: each parameter's gradient is partitioned
        from deepspeed.utils import safe_get_full_grad

        grads = [(name, safe_get_full_grad(p)) for name, p in model.module.named_parameters()]
    else:
        grads = [(name, _full(p.grad)) for name, p in model.named_parameters()]
    total = got.detach().clone()
    dist.all_reduce(total)

    def close(ours, theirs, what):
        error = relative_error(ours, theirs)
        assert error <= tolerance, f"rank {rank}: {tag} {what}: relative error {error:.2e}"

    close(total / world, expected, "loss")
    for (name, grad), q in zip(grads, single.parameters(), strict=True):
        close(grad, q.grad, name)


def zero3_direct():
    """ZeRO-3 without ``add_fused_forward``: ``integrations.hf``'s functions on the engine's model
    (the decoder's hooks and the lm_head's gather as in its forward), and a public function on the
    lm_head weight, which is refused partitioned and right inside ``GatheredParameters``."""
    import deepspeed
    import transformers

    import fused_pref.integrations.hf as fph

    config, ids, labels = _llama_batch()
    torch.manual_seed(0)
    single = transformers.LlamaForCausalLM(config)
    expected = fph.linear_cross_entropy(single, ids, labels)
    expected.backward()
    rows = _rows()
    for how in ("integrations.hf", "GatheredParameters"):
        torch.manual_seed(0)
        engine = _zero3(transformers.LlamaForCausalLM(config))
        if how == "integrations.hf":
            got = fph.linear_cross_entropy(engine.module, ids[rows], labels[rows])
            engine.backward(got)
        else:
            hidden = fph.hidden_states(engine.module, ids[rows])
            weight = engine.module.lm_head.weight
            try:
                fused_pref.linear_cross_entropy(hidden, weight, labels[rows], shift=True)
            except ValueError as error:
                assert "DeepSpeed ZeRO-3 parameter partitioned" in str(error), str(error)
            else:
                raise AssertionError("a partitioned weight was not refused")
            with deepspeed.zero.GatheredParameters([weight]):
                got = fused_pref.linear_cross_entropy(hidden, weight, labels[rows], shift=True)
                engine.backward(got)
        _same_as_single(f"zero3 {how}", engine, got, single, expected)

    # DPO with a reference model, both ZeRO-3 engines: the reference's log-probs come from its own
    # head's gather, reduced as IPO reduces them (averaged).
    def dpo(model, ref_model, rows):
        return fph.dpo_loss(model, ids[rows], labels[rows], ref_model=ref_model, loss_type="ipo").loss

    torch.manual_seed(0)
    single = transformers.LlamaForCausalLM(config)
    torch.manual_seed(1)
    single_ref = transformers.LlamaForCausalLM(config)
    world = dist.get_world_size()
    expected = dpo(single, single_ref, torch.arange(2 * world))
    expected.backward()
    torch.manual_seed(0)
    engine = _zero3(transformers.LlamaForCausalLM(config))
    torch.manual_seed(1)
    ref_engine = _zero3(transformers.LlamaForCausalLM(config))
    mine = torch.arange(world).chunk(world)[dist.get_rank()]
    got = dpo(engine.module, ref_engine.module, torch.cat([mine, mine + world]))   # this rank's pair
    engine.backward(got)
    _same_as_single("zero3 integrations.hf dpo_loss", engine, got, single, expected)


def trl_sharded(wrap):
    """``FusedDPOTrainer``'s loss step with the policy and the reference model under FSDP2 (each decoder
    layer, then the root), as ZeRO-3 engines or with their lm_heads tensor-parallel (``dtensor``:
    every rank runs the whole batch): each rank's pairs give the single process's full-batch loss,
    every gradient and every metric logged (the entropy and token accuracy among them).
    accelerate turns FSDP and DeepSpeed on for accelerators only, so the models are wrapped here by
    hand, as accelerate wraps them, and the trainer's own accelerator is the multi-CPU one (its
    metrics gathered over the ranks)."""
    import copy
    import tempfile

    import trl
    from test_trl import pairs, tiny_llama, tokenizer
    from torch.distributed.device_mesh import init_device_mesh

    from fused_pref.integrations.trl import FusedDPOTrainer

    config = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.5, bf16=False, per_device_train_batch_size=4,
                           use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = FusedDPOTrainer(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=config,
                              train_dataset=pairs(), processing_class=tokenizer())
    pairs_count = 4
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs_count)])
    single, single_ref = trainer.model, trainer.ref_model
    expected = trainer.compute_loss(single, batch)
    expected.backward()
    expected_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    policy, reference = copy.deepcopy(single), copy.deepcopy(single_ref)
    policy.zero_grad(set_to_none=True)
    if wrap == "dtensor":    # the lm_heads split on the vocabulary; every rank runs every pair
        mine = torch.arange(pairs_count)
    else:
        mine = torch.arange(pairs_count).chunk(dist.get_world_size())[dist.get_rank()]
    if wrap == "zero3":
        policy, reference = _zero3(policy), _zero3(reference)
    elif wrap == "dtensor":
        policy, reference = _tensor_parallel_head(policy), _tensor_parallel_head(reference)
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        policy, reference = _fsdp(policy, mesh, wrap), _fsdp(reference, mesh, wrap)
    trainer.model, trainer.ref_model = policy, reference
    rows = torch.cat([mine, mine + pairs_count])      # this rank's pairs, chosen rows first
    got = trainer.compute_loss(policy, {name: value[rows] for name, value in batch.items()})
    if wrap == "zero3":
        policy.backward(got)
    else:
        got.backward()
    _same_as_single(f"trl-{wrap}", policy, got, single, expected)
    for name, value in expected_metrics.items():
        if name != "num_tokens":      # a running total over the steps
            value_here = trainer._metrics["train"][name][-1]
            assert abs(value_here - value) <= 1e-5 * max(1.0, abs(value)), f"trl-{wrap} {name}: {value_here} vs {value}"


def grpo_sharded(wrap):
    """``FusedGRPOTrainer``'s per-token log-probs and entropies (the policy's, which TRL's loss then
    reads) with the policy under FSDP2 or ZeRO-3, or its lm_head tensor-parallel (``dtensor``): each
    rank's completions give the single process's values, and a weighted sum of both the gradient
    of every parameter."""
    import copy
    import tempfile

    import trl
    from test_trl import _completion_reward, pairs, tiny_llama, tokenizer
    from torch.distributed.device_mesh import init_device_mesh

    from fused_pref.integrations.trl import FusedGRPOTrainer

    world = dist.get_world_size()
    config = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), temperature=0.7, num_generations=4,
                            max_completion_length=6, per_device_train_batch_size=4, bf16=False, use_cpu=True,
                            report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = FusedGRPOTrainer(model=tiny_llama(), args=config, train_dataset=pairs(n=8).select_columns(["prompt"]),
                               reward_funcs=_completion_reward, processing_class=tokenizer())
    gen = torch.Generator().manual_seed(7)
    rows_count, T, K = 2 * world, 12, 5
    ids = torch.randint(3, 67, (rows_count, T), generator=gen)
    mask = (torch.arange(T) < T - torch.arange(rows_count)[:, None] % 3).long()   # right-padded completions
    weights = torch.randn(2, rows_count, K, generator=gen)

    def scored(model, rows):
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(model, ids[rows], mask[rows], K,
                                                                       compute_entropy=True)
        return logps, entropy, (logps * weights[0, rows]).sum() + (entropy * weights[1, rows]).sum()

    single = trainer.model
    all_rows = torch.arange(rows_count)
    logps, entropy, expected = scored(single, all_rows)
    expected.backward()
    model = copy.deepcopy(single)
    model.zero_grad(set_to_none=True)
    rows = all_rows.chunk(world)[dist.get_rank()]
    if wrap == "zero3":
        model = _zero3(model)
    elif wrap == "dtensor":    # the lm_head split on the vocabulary; every rank scores every completion
        model, rows = _tensor_parallel_head(model), all_rows
    else:
        model = _fsdp(model, init_device_mesh("cpu", (world,)), wrap)
    got_logps, got_entropy, got = scored(model, rows)
    _close(got_logps, logps[rows], f"grpo-{wrap} logps")
    _close(got_entropy, entropy[rows], f"grpo-{wrap} entropy")
    # The ranks' gradients are averaged, and their sums add up to the full sum: scaled by the world,
    # both compare as the mean losses of the other checks do.  (Under tensor parallelism each rank's
    # loss is the full sum already.)
    got = got if wrap == "dtensor" else got * world
    if wrap == "zero3":
        model.backward(got)
    else:
        got.backward()
    _same_as_single(f"grpo-{wrap}", model, got, single, expected)


def main(checks):
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    try:
        for check in checks:
            if check.startswith("vocab-stats"):
                vocab_parallel_statistics(check.removeprefix("vocab-stats").removeprefix("-") or "narrow")
            elif check == "vocab-compile":
                vocab_parallel_compiled()
            elif check == "vocab-inforward":
                vocab_parallel_in_forward()
            elif check.startswith("vocab-"):
                vocab_parallel(check.removeprefix("vocab-"))
            elif check == "dtensor":
                dtensor_parallel()
            elif check.startswith("grpo-"):
                grpo_sharded(check.removeprefix("grpo-"))
            elif check.startswith("trl-"):
                trl_sharded(check.removeprefix("trl-"))
            elif check == "zero3-direct":
                zero3_direct()
            elif check.startswith("hf-"):
                hf_sharded(check.removeprefix("hf-"))
            else:
                data_parallel(check)
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"ok {check} world={dist.get_world_size()}", flush=True)
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every rank passed the last barrier.  Leave without gloo's teardown, which once aborted
    # ("terminate called without an active exception") after all checks had passed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
