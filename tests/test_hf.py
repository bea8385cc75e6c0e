"""fused_pref.integrations.hf on tiny random transformers models built from their config classes
(no download), on the kernels' device: our losses on the decoder's hidden states equal the same
losses computed from the model's own logits, values and every parameter's gradient."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_pref  # noqa: E402
import fused_pref.integrations.hf as fph  # noqa: E402

V, D, T = 301, 32, 13   # V odd and not a power of two; 2 layers keep the interpreter quick

COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# name: (config class, model class, config overrides).  Gemma-2's softcap is lowered from 30 so that
# it bends the small logits of a random model; Cohere and Granite get a logit multiplier that is not 1.
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "final_logit_softcapping": 0.5}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),   # an lm_head with a bias
}


def make_model(name, device, seed=0):
    config_cls, model_cls, overrides = MODELS[name]
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=64,
                                         bos_token_id=1, eos_token_id=2)
    else:
        config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()   # eval: no dropout (GPT-2, Phi)
    with torch.no_grad():
        # Random init gives near-uniform predictions; a larger head makes them confident, as trained ones are.
        model.get_output_embeddings().weight.mul_(8.0)
        if model.get_output_embeddings().bias is not None:
            model.get_output_embeddings().bias.normal_(0, 0.5)
    return model.to(device)   # built on the CPU, so that every device starts from the same weights


def make_batch(device, pairs=2, seed=0):
    """``2 * pairs`` right-padded sequences, chosen first: a shared prompt, a completion, padding;
    labels are the input ids with -100 on prompt and padding (Hugging Face alignment)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, V, (2 * pairs, T), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for r in range(2 * pairs):
        prompt, length = 3 + r % 2, T - (r * 3) % 5
        input_ids[r, length:] = 0
        attention_mask[r, length:] = 0
        labels[r, :prompt] = -100
        labels[r, length:] = -100
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def logits_logps(model, input_ids, attention_mask, labels):
    """Per-sequence (sum, mean) of the log-probs of the shifted labels under the model's own logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    target, valid = labels[:, 1:], labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * valid
    return logp.sum(-1), logp.sum(-1) / valid.sum(-1)


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_close_grads(ours, theirs, rtol=2e-4):
    assert ours.keys() == theirs.keys()
    for name in ours:
        error = (ours[name] - theirs[name]).norm() / theirs[name].norm().clamp(min=1e-30)
        assert error < rtol, f"d {name}: {error:.2e}"


@pytest.mark.parametrize("name", list(MODELS))
def test_output_head_reads_the_config(name, device):
    model = make_model(name, device)
    head = fph.output_head(model)
    assert head.weight is model.get_output_embeddings().weight
    assert (head.bias is not None) == (name == "phi")
    assert head.softcap == (0.5 if name == "gemma2" else None)
    assert head.logit_scale == {"cohere": 0.25, "granite": 0.25}.get(name, 1.0)
    tied = name in ("gemma2", "gpt2", "cohere")   # these configs tie the embeddings by default
    assert (head.weight is model.get_input_embeddings().weight) == tied
    hidden = fph.hidden_states(model, *make_batch(device)[:2])
    assert hidden.shape == (4, T, D)


def assert_cross_entropy_is_the_models(model, input_ids, attention_mask, labels):
    """fph.linear_cross_entropy equals the model's own loss, and so does every parameter's gradient."""
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    theirs.backward()
    their_grads = grads(model)
    ours = fph.linear_cross_entropy(model, input_ids, labels, attention_mask)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours.backward()
    assert_close_grads(grads(model), their_grads)


@pytest.mark.parametrize("name", list(MODELS))
def test_cross_entropy_and_gradients_equal_the_models_own_loss(name, device):
    assert_cross_entropy_is_the_models(make_model(name, device), *make_batch(device, seed=1))


def _recurrent_gemma():
    # Its softcap is logits_soft_cap, lowered from 30 to bend a random model's logits.
    return transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
        num_key_value_heads=1, lru_width=D, attention_window_size=16, block_types=["recurrent", "attention"],
        logits_soft_cap=0.5, pad_token_id=0))


def _inkling():
    # lm_head(hidden / logits_mup_width_multiplier), its logits cut to unpadded_vocab_size.
    return transformers.InklingForCausalLM(transformers.InklingTextConfig(
        vocab_size=V, unpadded_vocab_size=V - 20, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        pad_token_id=0, d_rel=4, rel_extent=16, sliding_window_size=8, mlp_layer_types=["dense"]))


# Heads whose config says more than the attributes MODELS covers.
OTHER_HEADS = {"recurrent_gemma": _recurrent_gemma, "inkling": _inkling}


@pytest.mark.parametrize("name", list(OTHER_HEADS))
def test_other_heads_equal_the_models_own_loss(name, device):
    torch.manual_seed(0)
    model = OTHER_HEADS[name]().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    model.to(device)
    input_ids, attention_mask, labels = make_batch(device, seed=1)
    labels = labels.masked_fill(labels >= V - 20, -100)   # inside Inkling's unpadded vocabulary
    assert_cross_entropy_is_the_models(model, input_ids, attention_mask, labels)


def test_logit_multipliers_follow_each_models_forward():
    from transformers.models.granite4_vision.configuration_granite4_vision import Granite4VisionTextConfig
    from transformers.models.granite_docling.configuration_granite_docling import GraniteDoclingTextConfig

    # The vision models' text configs divide, as their forwards do; MPT's forward never reads its
    # logit_scale (a number or a string such as "inv_sqrt_d_model").
    assert fph.logit_multiplier(GraniteDoclingTextConfig(logits_scaling=4.0)) == 0.25
    assert fph.logit_multiplier(Granite4VisionTextConfig(logits_scaling=4.0)) == 0.25
    for scale in (0.5, "inv_sqrt_d_model"):
        assert fph.logit_multiplier(transformers.MptConfig(logit_scale=scale)) == 1.0


def test_a_head_transform_is_refused_and_a_nested_plain_head_is_not(device):
    # BERT-style heads apply dense, activation and norm before the projection: the loss would skip them.
    config = transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, is_decoder=True)
    model = transformers.BertLMHeadModel(config).to(device)
    input_ids, attention_mask, labels = make_batch(device)
    with pytest.raises(NotImplementedError, match=r"^BertLMHeadModel has parameters outside its decoder \(BertModel\) "
                                                  r"and its output layer \(cls\.predictions\.transform"):
        fph.linear_cross_entropy(model, input_ids, labels, attention_mask)
    # BertGeneration's head is the same layer nested in a module whose bias is that layer's: no
    # transform, so it is taken, and gives the model's own loss.
    config = transformers.BertGenerationConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, is_decoder=True)
    model = transformers.BertGenerationDecoder(config).eval().to(device)
    theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ours = fph.linear_cross_entropy(model, input_ids, labels, attention_mask)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_simpo_equals_simpo_on_the_models_logits(name, device):
    model = make_model(name, device)
    input_ids, attention_mask, labels = make_batch(device, seed=2)
    beta, gamma = 2.0, 0.5
    _, mean = logits_logps(model, input_ids, attention_mask, labels)
    theirs = -torch.nn.functional.logsigmoid(beta * (mean[:2] - mean[2:]) - gamma).mean()
    theirs.backward()
    their_grads = grads(model)
    out = fph.simpo_loss(model, input_ids, labels, attention_mask, beta=beta, gamma=gamma)
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert out.chosen_logps.tolist() == pytest.approx(mean[:2].tolist(), rel=1e-5)
    out.loss.backward()
    assert_close_grads(grads(model), their_grads)


def test_a_reference_head_gathered_by_hooks_takes_the_calls_options(device, monkeypatch):
    # FSDP / ZeRO-3 gather the reference head inside its own call, where its log-probs are computed:
    # with the loss's options (a temperature, an ignore_index), as when the head is a plain layer.
    model, ref_model = make_model("llama", device, seed=0), make_model("llama", device, seed=1)
    input_ids, attention_mask, labels = make_batch(device, seed=3)
    labels = labels.masked_fill(labels == -100, -1)
    options = dict(beta=0.1, temperature=0.7, ignore_index=-1, validate=False)
    plain = fph.dpo_loss(model, input_ids, labels, attention_mask, ref_model=ref_model, **options)
    monkeypatch.setattr(fph, "gathered_by_hooks", lambda layer: layer is ref_model.get_output_embeddings())
    gathered = fph.dpo_loss(model, input_ids, labels, attention_mask, ref_model=ref_model, **options)
    assert gathered.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert gathered.chosen_rewards.tolist() == pytest.approx(plain.chosen_rewards.tolist(), rel=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere"])
def test_dpo_with_a_reference_model_equals_dpo_on_both_models_logits(name, device):
    model, ref_model = make_model(name, device, seed=0), make_model(name, device, seed=1)
    input_ids, attention_mask, labels = make_batch(device, seed=3)
    beta = 0.1
    policy, _ = logits_logps(model, input_ids, attention_mask, labels)
    with torch.no_grad():
        ref, _ = logits_logps(ref_model, input_ids, attention_mask, labels)
    u = (policy[:2] - ref[:2]) - (policy[2:] - ref[2:])
    theirs = -torch.nn.functional.logsigmoid(beta * u).mean()
    theirs.backward()
    their_grads = grads(model)
    out = fph.dpo_loss(model, input_ids, labels, attention_mask, ref_model=ref_model, beta=beta)
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx((beta * (policy[:2] - ref[:2])).tolist(), rel=1e-4)
    out.loss.backward()
    assert_close_grads(grads(model), their_grads)
    assert not any(p.grad is not None for p in ref_model.parameters())
    same = fph.dpo_loss(model, input_ids, labels, attention_mask, ref_logps=ref, beta=beta)
    assert same.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_a_padding_free_batch_equals_the_models_own_loss(device):
    # One row of packed sequences with position ids restarting at each (TRL's padding_free): the
    # first label of each sequence is -100, as DataCollatorWithFlattening sets it, so the model's
    # shift across the row and ours within each sequence target the same tokens.
    model = make_model("llama", device)
    lengths = (5, 7, 4, 6)
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, V, (1, sum(lengths)), generator=gen).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    cu_seqlens = torch.tensor([0, 5, 12, 16, 22], dtype=torch.int32, device=device)
    labels = input_ids.clone()
    labels[0, cu_seqlens[:-1]] = -100
    # Without a cache, as in training: transformers then masks attention to each packed sequence
    # (with one, it attends across the row).
    theirs = model(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False).loss
    theirs.backward()
    their_grads = grads(model)
    ours = fph.linear_cross_entropy(model, input_ids, labels, model_kwargs={"position_ids": position_ids},
                                    cu_seqlens=cu_seqlens)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours.backward()
    assert_close_grads(grads(model), their_grads)
    # The position ids each packed sequence needs are made from cu_seqlens when not given.
    assert fph.linear_cross_entropy(model, input_ids, labels, cu_seqlens=cu_seqlens).item() == ours.item()
    # A reference model's hidden states are flattened too: the same loss as from its log-probs.
    ref_model, packed = make_model("llama", device, seed=1), dict(model_kwargs={"position_ids": position_ids},
                                                                   cu_seqlens=cu_seqlens)
    with torch.no_grad():
        ref_logps = fph.sequence_logprobs(ref_model, input_ids, labels, **packed)
    by_model = fph.dpo_loss(model, input_ids, labels, ref_model=ref_model, **packed)
    by_logps = fph.dpo_loss(model, input_ids, labels, ref_logps=ref_logps, **packed)
    assert ref_logps.shape == (4,) and by_model.loss.item() == pytest.approx(by_logps.loss.item(), rel=1e-6)
    made = fph.dpo_loss(model, input_ids, labels, ref_model=ref_model, cu_seqlens=cu_seqlens)
    assert made.loss.item() == by_model.loss.item()
    # Two rows are not a padding-free batch: the message names the inputs the caller passed.
    with pytest.raises(ValueError, match=r"^with cu_seqlens, input_ids must be one row of packed sequences \[1, N\]"):
        fph.linear_cross_entropy(model, input_ids.view(2, 11), labels.view(2, 11), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"^labels must be \[1, N\] as input_ids are \(or \[N\]\), N = 22; "
                                         r"got \(2, 11\)$"):
        fph.linear_cross_entropy(model, input_ids, labels.view(2, 11), cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"^a padding-free batch \(cu_seqlens\) takes no attention_mask"):
        fph.linear_cross_entropy(model, input_ids, labels, torch.ones_like(input_ids), cu_seqlens=cu_seqlens)
    # Bad boundaries reach the loss's own check (making the position ids cannot fail on them).
    short = torch.tensor([0, 5, 12, 16, 20], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"^cu_seqlens must start at 0, end at N = 22 and never decrease"):
        fph.linear_cross_entropy(model, input_ids, labels, cu_seqlens=short)


def test_fused_forward_returns_what_the_function_makes_and_keeps_the_original(device):
    model = make_model("gemma2", device)
    input_ids, attention_mask, labels = make_batch(device, seed=4)
    fph.add_fused_forward(model)
    fph.add_fused_forward(model)    # a second patch changes nothing
    out = model(input_ids, attention_mask=attention_mask,
                fused_pref=lambda h, head: head.apply(fused_pref.simpo_loss, h, labels))
    direct = fph.simpo_loss(model, input_ids, labels, attention_mask)
    assert out.loss.item() == direct.loss.item()
    plain = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert plain.logits.shape == (4, T, V)


def test_a_copy_of_a_patched_model_runs_its_own_weights(device):
    model = fph.add_fused_forward(make_model("llama", device))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.neg_()
    input_ids = make_batch(device)[0]
    torch.testing.assert_close(twin(input_ids).logits, -model(input_ids).logits)


def test_softcap_and_shift_come_from_the_model(device):
    model = make_model("llama", device)
    input_ids, attention_mask, labels = make_batch(device)
    with pytest.raises(TypeError, match="softcap comes from the model"):
        fph.simpo_loss(model, input_ids, labels, attention_mask, softcap=30.0)
    with pytest.raises(ValueError, match="exactly one of ref_model and ref_logps"):
        fph.dpo_loss(model, input_ids, labels, attention_mask)


def test_head_follows_autocast_like_nn_linear(device):
    model = make_model("phi", device)
    hidden = torch.randn(2, 5, D, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        h, w, b = fph.output_head(model).inputs(hidden)
        expected = model.get_output_embeddings()(hidden).dtype
    assert h.dtype == w.dtype == b.dtype == expected == torch.bfloat16
    assert fph.output_head(model).inputs(hidden)[1].dtype == torch.float32


def test_the_loss_runs_as_the_output_layers_forward_inside_its_hooks(device, monkeypatch):
    """Sharding engines gather the head with hooks around its call (FSDP2, ZeRO-3): the loss runs as
    that call, its tensors handed to the hooks, which may replace them (as DeepSpeed does); the
    layer's own forward is back afterwards, after an error too.  Without such an engine, hooks on
    the head (tensor parallelism's, which expect logits) are left alone."""
    model = make_model("llama", device)
    input_ids, attention_mask, labels = make_batch(device, seed=5)
    expected = fph.simpo_loss(model, input_ids, labels, attention_mask)
    expected.loss.backward()
    expected_grads = grads(model)
    head = model.get_output_embeddings()
    seen = []
    pre = head.register_forward_pre_hook(lambda layer, args: seen.append(("pre", args[0].shape)))

    def replace_outputs(layer, args, output):
        seen.append(("post", type(output), len(output)))
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in output)

    post = head.register_forward_hook(replace_outputs)
    fph.simpo_loss(model, input_ids, labels, attention_mask)
    assert seen == []                 # no engine: a plain call
    monkeypatch.setattr(fph, "gathered_by_hooks", lambda layer: True)
    out = fph.simpo_loss(model, input_ids, labels, attention_mask)
    assert isinstance(out, fused_pref.PreferenceOutput) and out.loss.grad_fn.name() == "CloneBackward0"
    assert seen == [("pre", (4, T, D)), ("post", tuple, 7)]
    assert out.loss.item() == expected.loss.item()
    out.loss.backward()
    assert_close_grads(grads(model), expected_grads, rtol=1e-6)
    assert "forward" not in vars(head)

    def failing(hidden, head):
        raise RuntimeError("inside the loss")

    with pytest.raises(RuntimeError, match="inside the loss"):
        fph.run_as_output_layer(model, failing, torch.zeros(1, 2, D, device=device))
    assert "forward" not in vars(head)
    pre.remove()
    post.remove()
    monkeypatch.undo()
    assert model(input_ids).logits.shape == (4, T, V)


def test_the_loss_runs_inside_accelerates_hooks(device):
    """accelerate's hooks (device_map dispatch) replace the layer's forward and call the original as
    ``_old_forward``: the loss stands in for that one, the hook runs around it."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Counting(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model = make_model("llama", device)
    input_ids, attention_mask, labels = make_batch(device, seed=6)
    expected = fph.linear_cross_entropy(model, input_ids, labels, attention_mask)
    head = model.get_output_embeddings()
    hooks.add_hook_to_module(head, Counting())
    original = head._old_forward
    got = fph.linear_cross_entropy(model, input_ids, labels, attention_mask)
    assert Counting.calls == 1 and got.item() == expected.item()
    assert head._old_forward is original
    assert model(input_ids).logits.shape == (4, T, V) and Counting.calls == 2


def test_compiles_through_the_fused_forward(device):
    """``torch.compile`` of a model patched by ``add_fused_forward``, and of a loss function of this
    module (TRL's ``torch_compile=True`` compiles the forward)."""
    model = fph.add_fused_forward(make_model("llama", device))
    input_ids, attention_mask, labels = make_batch(device, seed=7)
    expected = fph.linear_cross_entropy(model, input_ids, labels, attention_mask)

    def loss(h, head):
        return head.apply(fused_pref.linear_cross_entropy, h, labels)

    compiled = torch.compile(model, backend="eager")
    assert compiled(input_ids, attention_mask=attention_mask, fused_pref=loss).item() == pytest.approx(
        expected.item(), rel=1e-6)
    compiled_fn = torch.compile(fph.linear_cross_entropy, backend="eager")
    assert compiled_fn(model, input_ids, labels, attention_mask).item() == pytest.approx(expected.item(), rel=1e-6)
