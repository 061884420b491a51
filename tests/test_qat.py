"""Quantization-aware training: trainable mode on whole models, Trainer + callback, distillation, PEFT LoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_littlebit
from hf_littlebit import (
    DistillationConfig,
    LittleBitConfig,
    LittleBitQATCallback,
    LittleBitTrainer,
    LittleBitTrainingError,
    distillation_loss,
)
from hf_littlebit.nn.layer import littlebit_layers

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


def _dataset(n: int = 8, seqlen: int = 16, seed: int = 0) -> list[dict]:
    ids = torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def _trainable(path: str, **cfg) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0, trainable=True,
                                                                                           **cfg))


def _first_layer(model) -> hf_littlebit.LittleBitLinear:
    return next(iter(littlebit_layers(model).values()))


def test_trainable_load_gradients_reach_latents_scales_norms_not_embeddings(fp_checkpoint, tokens):
    model = _trainable(fp_checkpoint("llama"))
    assert all(layer.is_trainable for layer in littlebit_layers(model).values())
    model.train()
    model(input_ids=tokens, labels=tokens).loss.backward()
    layer = _first_layer(model)
    for name in ("u_latent", "v_latent", "h", "l", "g", "res_u_latent", "res_v_latent", "res_h"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.model.norm.weight.grad is not None
    assert not model.model.embed_tokens.weight.requires_grad and model.model.embed_tokens.weight.grad is None
    assert not model.lm_head.weight.requires_grad


def test_trainable_is_a_loading_attribute_and_never_saved(fp_checkpoint, tmp_path):
    model = _trainable(fp_checkpoint("qwen2"), sign_estimator="smoothsign")
    assert "trainable" not in model.config.quantization_config.to_dict()
    model.save_pretrained(tmp_path / "q")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(layer.is_packed for layer in littlebit_layers(plain).values())
    again = AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", quantization_config=LittleBitConfig(trainable=True, sign_estimator="smoothsign")
    )
    layer = _first_layer(again)
    assert layer.is_trainable and layer.sign_estimator == "smoothsign"
    assert layer.bias is not None and layer.bias.requires_grad  # qwen2 q_proj has a bias; biases train in QAT


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_save_while_trainable_packs_and_reload_reproduces_logits(fp_checkpoint, tmp_path, tokens, arch):
    model = _trainable(fp_checkpoint(arch))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=_dataset())
    trainer.train()
    model.eval()
    model.save_pretrained(tmp_path / "q")
    assert all(layer.is_trainable for layer in littlebit_layers(model).values())  # saving did not pack it
    keys = load_file(str(tmp_path / "q" / "model.safetensors")).keys()
    assert not any("latent" in k for k in keys) and any(k.endswith("u_bits") for k in keys)
    model.littlebit_pack()
    assert all(layer.is_packed for layer in littlebit_layers(model).values())
    with torch.no_grad():
        packed_logits = model(tokens).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        torch.testing.assert_close(reloaded(tokens).logits, packed_logits)


def test_make_trainable_from_packed_keeps_the_function_and_trains(fp_checkpoint, tmp_path, tokens):
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"), quantization_config=LittleBitConfig(bpw=1.0))
    with torch.no_grad():
        before = model(tokens).logits
    hf_littlebit.make_trainable(model, estimator="smoothsign")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before)
    latent = _first_layer(model).u_latent.detach().clone()
    Trainer(model=model, args=_args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=_dataset()).train()
    assert not torch.equal(_first_layer(model).u_latent.detach(), latent)


def test_trainer_refuses_a_packed_model_with_our_message(fp_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"), quantization_config=LittleBitConfig(bpw=1.0))
    with pytest.raises(LittleBitTrainingError, match="make_trainable"):
        Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset())
    with pytest.raises(LittleBitTrainingError, match="packed"):
        LittleBitQATCallback().on_train_begin(None, None, None, model=model)


def test_trainer_checkpoint_reloads_into_a_trainable_model(fp_checkpoint, tmp_path):
    model = _trainable(fp_checkpoint("llama"))
    Trainer(model=model, args=_args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=_dataset()).train()
    model.save_pretrained(tmp_path / "ckpt")
    fresh = _trainable(fp_checkpoint("llama"), seed=7)
    missing, unexpected = fresh.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")), strict=False)
    assert not unexpected and not [k for k in missing if "lm_head" not in k]
    for (name, a), b in zip(littlebit_layers(model).items(), littlebit_layers(fresh).values(), strict=True):
        for prefix in a.path_prefixes:
            for latent in ("u_latent", "v_latent"):
                assert torch.equal(torch.sign(getattr(a, prefix + latent)) >= 0,
                                   torch.sign(getattr(b, prefix + latent)) >= 0), name
            torch.testing.assert_close(getattr(b, prefix + "h"), getattr(a, prefix + "h").half().float())


def test_distillation_loss_zero_for_identical_models_and_batchmean_scales_with_length():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    hidden = tuple(torch.randn(2, 5, 8) for _ in range(3))
    loss, parts = distillation_loss(logits, logits, hidden, hidden)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and parts["hidden_mse"] == pytest.approx(0.0, abs=1e-9)
    other = torch.randn(2, 5, 11)
    token_mean, _ = distillation_loss(logits, other, config=DistillationConfig(kd_reduction="token_mean"))
    batchmean, _ = distillation_loss(logits, other, config=DistillationConfig(kd_reduction="batchmean"))
    assert token_mean.item() > 0
    assert batchmean.item() == pytest.approx(5 * token_mean.item(), rel=1e-5)
    # the paper's kl_div(log_softmax(student), teacher, reduction="batchmean") on (B, T, V) logits
    ref = torch.nn.functional.kl_div(logits.log_softmax(-1), other.log_softmax(-1), log_target=True,
                                     reduction="batchmean")
    assert batchmean.item() == pytest.approx(ref.item(), rel=1e-5)


def test_token_normalized_hidden_loss_is_relative_per_token():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 7)
    teacher = torch.randn(1, 3, 4)
    teacher[0, 0] *= 1e4  # one massive-activation token
    student = teacher * 1.1  # 10% error on every token
    hidden_s, hidden_t = (teacher, student), (teacher, teacher)
    relative = DistillationConfig(hidden_loss="token_normalized", hidden_mse_weight=1.0)
    _, parts = distillation_loss(logits, logits, hidden_s, hidden_t, config=relative)
    assert parts["hidden_mse"] == pytest.approx(0.01, rel=1e-4)  # same for every token, whatever its norm
    _, plain = distillation_loss(logits, logits, hidden_s, hidden_t, config=DistillationConfig())
    assert plain["hidden_mse"] > 1e4 * parts["hidden_mse"]  # plain MSE is dominated by the massive token
    with pytest.raises(ValueError, match="hidden_loss"):
        DistillationConfig(hidden_loss="l1")


def test_kd_trainer_lowers_the_distillation_loss_on_a_fixed_batch(fp_checkpoint, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"))
    student = _trainable(fp_checkpoint("llama"), sign_estimator="smoothsign")
    batch = _dataset(n=4)
    trainer = LittleBitTrainer(model=student, args=_args(tmp_path, max_steps=12, learning_rate=5e-3,
                                                         lr_scheduler_type="constant"),
                               train_dataset=batch, teacher=teacher)
    trainer.train()
    history = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(history) == 12
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] and last["kd_loss"] < first["kd_loss"]
    assert "sign_flip_rate" in first and "hidden_mse" in first
    assert all(layer.is_packed for layer in littlebit_layers(student).values())  # packed at the end
    assert all(not p.requires_grad for p in teacher.parameters())


def test_plain_trainer_with_callback_loss_and_residual_schedule(fp_checkpoint, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(fp_checkpoint("llama"))
    student = _trainable(fp_checkpoint("llama"))
    callback = LittleBitQATCallback(teacher=teacher, residual_start_step=2, pack_at_end=False)
    res_before = _first_layer(student).res_u_latent.detach().clone()
    trainer = Trainer(model=student, args=_args(tmp_path, max_steps=4, learning_rate=1e-3),
                      train_dataset=_dataset(), callbacks=[callback], compute_loss_func=callback.loss)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "residual_share" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert logs[0]["residual_share"] == 0.0 and logs[1]["residual_share"] == 0.0
    assert 0.0 < logs[2]["residual_share"] < 1.0
    assert "kd_loss" in logs[0]
    layer = _first_layer(student)
    assert layer.residual_enabled and layer.is_trainable
    assert not torch.equal(layer.res_u_latent.detach(), res_before)  # re-fitted from the teacher at step 2


def test_lm_only_callback_without_teacher(fp_checkpoint, tmp_path):
    student = _trainable(fp_checkpoint("gemma3"))
    callback = LittleBitQATCallback()
    trainer = Trainer(model=student, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(),
                      callbacks=[callback])
    trainer.train()
    assert all(layer.is_packed for layer in littlebit_layers(student).values())
    assert any("sign_flip_rate" in h for h in trainer.state.log_history)


def test_peft_lora_on_packed_model_trains_saves_and_reloads(fp_checkpoint, tmp_path, tokens):
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_littlebit.integrations.peft_lora import LittleBitLoraLinear

    path = fp_checkpoint("llama")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LittleBitConfig(bpw=1.0))
    model.save_pretrained(tmp_path / "packed")
    with torch.no_grad():
        base = model(tokens).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]  # the mapped type is supported
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, LittleBitLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, base)  # B = 0 at init
    packed = {n: p.detach().clone() for n, p in peft_model.named_parameters() if n.endswith("u_bits")}
    Trainer(model=peft_model, args=_args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=_dataset()).train()
    with torch.no_grad():
        trained = peft_model(tokens).logits
    assert not torch.allclose(trained, base)
    for n, p in peft_model.named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n])  # the packed base never changes
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "packed"),
                                         tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, trained)
    with pytest.raises(NotImplementedError, match="merged"):
        reloaded.merge_and_unload()
