"""Run by tests/test_distributed.py under torchrun (gloo, CPU, kernels under the interpreter).

    torchrun --standalone --nproc-per-node W tests/distributed_worker.py \
        {vocab-chunk|vocab-split|dtensor|ddp|fsdp|hf-fsdp|hf-fsdp-bf16}...

Each check raises on a mismatch (non-zero exit) and rank 0 prints one "ok <check>" line.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fused_pref  # noqa: E402
from fused_pref.testing import TOLERANCE, as_reference, count_host_reads, make_inputs, relative_error  # noqa: E402

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


def hf_fsdp(mixed_precision):
    """A transformers Llama under FSDP2 as accelerate and TRL wrap it (every decoder layer, then the
    root, which holds the lm_head), our loss through its forward (``integrations.hf.add_fused_forward``,
    as the TRL trainers call it): each rank's share of the batch, and the loss and every parameter's
    gradient equal the single-process full batch's (fp32), or to bf16's resolution under a bf16
    ``MixedPrecisionPolicy``."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import fused_pref.integrations.hf as fph

    rank, world = dist.get_rank(), dist.get_world_size()
    config = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 301, (2 * world, 11), generator=gen)
    labels = ids.masked_fill(torch.arange(11) < 3, -100)   # the same valid count in every row

    def loss_of(model, ids, labels):
        return model(input_ids=ids, fused_pref=lambda h, head: head.apply(fused_pref.linear_cross_entropy, h, labels))

    torch.manual_seed(0)
    single = fph.add_fused_forward(transformers.LlamaForCausalLM(config))
    expected = loss_of(single, ids, labels)
    expected.backward()
    torch.manual_seed(0)
    model = fph.add_fused_forward(transformers.LlamaForCausalLM(config))
    mesh = init_device_mesh("cpu", (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    rows = torch.arange(2 * world).chunk(world)[rank]
    got = loss_of(model, ids[rows], labels[rows])
    got.backward()
    total = got.detach().clone()
    dist.all_reduce(total)
    tolerance = TOLERANCE[torch.bfloat16 if mixed_precision else torch.float32]
    tag = "hf-fsdp" + ("-bf16" if mixed_precision else "")

    def close(ours, theirs, what):
        error = relative_error(ours, theirs)
        assert error <= tolerance, f"rank {rank}: {tag} {what}: relative error {error:.2e}"

    close(total / world, expected, "loss")   # equal valid counts: the mean of the ranks' means
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        close(p.grad.full_tensor(), q.grad, name)


def main(checks):
    dist.init_process_group("gloo")
    try:
        for check in checks:
            if check.startswith("vocab-"):
                vocab_parallel(check.removeprefix("vocab-"))
            elif check == "dtensor":
                dtensor_parallel()
            elif check.startswith("hf-fsdp"):
                hf_fsdp(mixed_precision=check.endswith("bf16"))
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
