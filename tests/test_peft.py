"""LoRA and ``modules_to_save`` on the output layer (PEFT): our losses through
fused_pref.integrations.hf use the adapted head, values and every trainable parameter's gradient
equal to the model's own loss."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fused_pref  # noqa: E402
import fused_pref.integrations.hf as fph  # noqa: E402
from fused_pref.testing import kernel_device, relative_error  # noqa: E402

V, D, T = 301, 32, 13


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def batch(device):
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, V, (3, T), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100
    return input_ids.to(device), labels.to(device)


def adapted(config, device):
    model = peft.get_peft_model(tiny_llama(), config).to(device)
    with torch.no_grad():
        # A trained-looking adapter: PEFT starts B at 0 (no change), and a modules_to_save copy
        # starts equal to the original; either would make the test unable to fail.
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def trainable_grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


CONFIGS = {
    "lora_head_and_attention": dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head", "q_proj"],
                                    init_lora_weights=False),
    "lora_head_with_bias": dict(r=3, lora_alpha=6, lora_dropout=0.0, target_modules=["lm_head"], lora_bias=True),
    "two_adapters_one_active": dict(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["lm_head"]),
    "two_adapters_both_active": dict(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["lm_head"]),
    "modules_to_save": dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                            modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_adapted_head_equals_the_models_own_loss(name):
    device = kernel_device()
    ours = adapted(peft.LoraConfig(**CONFIGS[name]), device)
    if name.startswith("two_adapters"):
        ours.add_adapter("other", peft.LoraConfig(**CONFIGS[name]))
        with torch.no_grad():
            for param_name, param in ours.named_parameters():
                if "lora_B.other" in param_name:
                    param.normal_(0, 0.5)
        if name.endswith("one_active"):
            ours.set_adapter("other")
        else:   # the sum of both adapters' terms
            ours.base_model.set_adapter(["default", "other"])
    theirs = copy.deepcopy(ours)
    input_ids, labels = batch(device)
    loss = fph.linear_cross_entropy(ours, input_ids, labels)
    expected = theirs(input_ids=input_ids, labels=labels).loss
    assert relative_error(loss, expected) <= 1e-5
    loss.backward()
    expected.backward()
    ours_grads, theirs_grads = trainable_grads(ours), trainable_grads(theirs)
    assert ours_grads.keys() == theirs_grads.keys()
    assert any("lm_head" in key for key in ours_grads), ours_grads.keys()
    for key, grad in ours_grads.items():
        assert relative_error(grad, theirs_grads[key]) <= 1e-5, key
    base = ours.get_output_embeddings().get_base_layer() if name != "modules_to_save" else None
    assert base is None or base.weight.grad is None    # the frozen head gets no gradient


def test_disabled_and_merged_adapters_are_the_base_and_merged_weights():
    device = kernel_device()
    model = adapted(peft.LoraConfig(**CONFIGS["lora_head_and_attention"]), device)
    input_ids, labels = batch(device)
    with torch.no_grad():
        with model.disable_adapter():
            assert relative_error(fph.linear_cross_entropy(model, input_ids, labels),
                                  model(input_ids=input_ids, labels=labels).loss) <= 1e-5
        adapted_loss = fph.linear_cross_entropy(model, input_ids, labels)
        model.merge_adapter()
        assert relative_error(fph.linear_cross_entropy(model, input_ids, labels), adapted_loss) <= 1e-5
        # Merged, then disabled (a reference pass after a weight sync merged the adapter): the base.
        with model.disable_adapter():
            ours = fph.linear_cross_entropy(model, input_ids, labels)
        with model.disable_adapter():
            theirs = model(input_ids=input_ids, labels=labels).loss
        assert relative_error(ours, theirs) <= 1e-5 and relative_error(ours, adapted_loss) > 1e-3


def test_a_lora_variant_on_the_output_layer_is_refused_where_one_weight_cannot_be_formed():
    # DoRA rescales each row of W + s B @ A by a learned magnitude: active it is not that sum, and
    # merged its merge is not a sum that subtracting s B @ A takes back (that gave a wrong base weight).
    device = kernel_device()
    model = adapted(peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lm_head"]), device)
    input_ids, labels = batch(device)
    pattern = r"^LoRA adapter 'default' on the output layer is a variant \(DoraLinearVariant"
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match=pattern):
            fph.linear_cross_entropy(model, input_ids, labels)
        model.merge_adapter()    # merged and active: the base layer's weight holds it, exactly
        assert relative_error(fph.linear_cross_entropy(model, input_ids, labels),
                              model(input_ids=input_ids, labels=labels).loss) <= 1e-5
        with model.disable_adapter(), pytest.raises(NotImplementedError, match=pattern):
            fph.linear_cross_entropy(model, input_ids, labels)


def test_lora_dropout_in_training_is_refused():
    device = kernel_device()
    model = adapted(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["lm_head"]), device)
    input_ids, labels = batch(device)
    model.train()
    with pytest.raises(NotImplementedError, match="lora_dropout=0.1 in training"):
        fph.linear_cross_entropy(model, input_ids, labels)
    model.eval()   # dropout off: the effective weight is exact
    with torch.no_grad():
        assert relative_error(fph.linear_cross_entropy(model, input_ids, labels),
                              model(input_ids=input_ids, labels=labels).loss) <= 1e-5


def test_an_adapted_layer_passed_as_weight_names_the_adapters_weight():
    # Its .weight is the base layer's, without the adapter: the message points to effective_linear.
    device = kernel_device()
    head = adapted(peft.LoraConfig(**CONFIGS["lora_head_with_bias"]), device).get_output_embeddings()
    hidden, labels = torch.randn(3, T, D, device=device), batch(device)[1]
    pattern = (r"^weight must be a torch\.Tensor, got \w+: for a PEFT-adapted layer pass the weight and bias "
               r"\(as bias\) of fused_pref\.integrations\.hf\.effective_linear")
    with pytest.raises(TypeError, match=pattern):
        fused_pref.linear_cross_entropy(hidden, head, labels)


def test_another_tuner_on_the_output_layer_is_refused():
    # Its .weight is the base layer's: the loss would silently leave the tuner out.
    device = kernel_device()
    model = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[]))
    input_ids, labels = batch(device)
    with pytest.raises(NotImplementedError, match=r"^peft\.tuners\.ia3\.\S+ on the output layer: fused_pref applies LoRA"):
        fph.linear_cross_entropy(model.to(device), input_ids, labels)


def test_prompt_learning_is_refused():
    # Its virtual tokens enter in the PEFT model's own forward: the loss would run without them, or
    # (through add_fused_forward, as the trainers call it) get P more hidden states than labels.
    device = kernel_device()
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = peft.get_peft_model(tiny_llama(), config).to(device)
    input_ids, labels = batch(device)
    pattern = r"^PEFT prompt learning \(PromptTuningConfig\) is not supported"
    with pytest.raises(NotImplementedError, match=pattern):
        fph.linear_cross_entropy(model, input_ids, labels)
    with pytest.raises(NotImplementedError, match=pattern):
        fph.add_fused_forward(model)
