"""The chunked causal-LM loss: exact against the full-logits loss, inside a real tiny Llama, and invisible elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from shardtune import ShardtuneError
from shardtune.losses import (
    ChunkedLMHead,
    chunked_cross_entropy,
    default_chunk_tokens,
    install_chunked_head,
    loss_backend,
    shift_labels,
)

B, T, H, V = 3, 17, 16, 50


def _labels() -> torch.Tensor:
    """Real-looking labels: runs of -100 (prompt / padding), a row with no target at all."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[0, 11:14] = -100  # a run in the middle
    labels[1, -4:] = -100  # right padding
    labels[2, :] = -100  # nothing to predict
    return labels


def _full_logits_loss(hidden, weight, bias, labels, z_loss):
    """The reference: every logit materialized, PyTorch's cross entropy, z-loss on the same tokens."""
    logits = F.linear(hidden, weight, bias)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    targets = shift_labels(labels)
    mask = targets != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    z = torch.logsumexp(logits, dim=-1)
    return ce + z_loss * (z.pow(2) * mask).sum(), mask.sum()


def _inputs(bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """Within `tol` relative to the larger magnitude (1e-6 of the scale; atol where values are near 0)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= tol * scale


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 64])  # 5: uneven chunks across rows; 64: all tokens in one chunk
def test_matches_the_full_logits_loss_and_its_gradients_in_fp32(z_loss, bias, chunk):
    labels = _labels()
    ref_in, ours_in = _inputs(bias), _inputs(bias)
    ref, ref_n = _full_logits_loss(*ref_in, labels, z_loss)
    ours, n, lse_sq = chunked_cross_entropy(*ours_in, labels, z_loss, chunk_tokens=chunk)
    assert int(n) == int(ref_n) == 9 + 12 + 0
    assert abs(ours.item() - ref.item()) <= 1e-6 * abs(ref.item())
    ref.backward()
    ours.backward()
    for r, o in zip(ref_in, ours_in):
        if r is not None:
            assert o.grad is not None and _close(o.grad, r.grad), (o.grad - r.grad).abs().max()
    assert ours_in[0].grad[2].abs().max() == 0  # the all-ignored row gets no gradient
    assert lse_sq.requires_grad is False


def test_fp64_agrees_to_rounding():
    """In float64 the chunked computation is the same mathematics: agreement far below fp32's tolerance."""
    labels = _labels()
    ref_in, ours_in = _inputs(False, torch.float64), _inputs(False, torch.float64)
    ref, _ = _full_logits_loss(*ref_in, labels, 0.1)
    ours, _, _ = chunked_cross_entropy(*ours_in, labels, 0.1, chunk_tokens=4)
    ref.backward(torch.tensor(0.5, dtype=torch.float64))  # a non-unit upstream gradient is applied too
    ours.backward(torch.tensor(0.5))
    assert abs(ours.item() - ref.item()) < 1e-12 * abs(ref.item())
    assert _close(ours_in[0].grad, ref_in[0].grad, 1e-12) and _close(ours_in[1].grad, ref_in[1].grad, 1e-12)


def test_a_batch_with_no_targets_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = _inputs(False)
    loss, n, _ = chunked_cross_entropy(hidden, weight, None, torch.full((B, T), -100), 0.1)
    loss.backward()
    assert loss.item() == 0 and int(n) == 0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_under_no_grad_it_computes_the_same_loss_and_no_gradient():
    labels = _labels()
    hidden, weight, _ = _inputs(False)
    with torch.no_grad():
        loss, _, _ = chunked_cross_entropy(hidden, weight, None, labels, 0.1, chunk_tokens=5)
    ref, _ = _full_logits_loss(hidden, weight, None, labels, 0.1)
    assert not loss.requires_grad and abs(loss.item() - ref.item()) <= 1e-6 * ref.item()


def test_a_second_backward_is_refused_not_silently_doubled():
    hidden, weight, _ = _inputs(False)
    loss, _, _ = chunked_cross_entropy(hidden, weight, None, _labels())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_holds_the_whole_batch_of_logits():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 64, 8, generator=g, requires_grad=True)
    weight = torch.randn(1000, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (4, 64), generator=g)
    with _LargestTensor() as plain:
        _full_logits_loss(hidden, weight, None, labels, 0.0)[0].backward()
    with _LargestTensor() as chunked:
        chunked_cross_entropy(hidden, weight, None, labels, 0.0, chunk_tokens=32)[0].backward()
    assert plain.largest >= 4 * 63 * 1000
    assert chunked.largest <= max(32 * 1000, weight.numel())  # one chunk of logits, or the weight's gradient


def test_bf16_autocast_multiplies_in_bf16_and_normalizes_in_fp32():
    """The reference computes bf16 logits (what the matmul gives under autocast), then the loss in fp32."""
    labels = _labels()
    hidden, weight, _ = _inputs(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = chunked_cross_entropy(hidden, weight, None, labels, 0.1, chunk_tokens=5)
    logits = F.linear(hidden.bfloat16(), weight.bfloat16()).float()
    targets = shift_labels(labels).reshape(-1)
    ref = F.cross_entropy(logits.reshape(-1, V), targets, ignore_index=-100, reduction="sum")
    z = torch.logsumexp(logits.reshape(-1, V), -1)[targets != -100]
    ref = ref + 0.1 * z.pow(2).sum()
    fp32, _ = _full_logits_loss(hidden, weight, None, labels, 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()  # same bf16 products, fp32 sums
    assert abs(loss.item() - fp32.item()) > 1e-4 * fp32.item()  # and not the fp32 computation
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_backend_choice():
    assert loss_backend(torch.device("cpu")) == "chunked"
    assert loss_backend(torch.device("cpu"), "chunked") == "chunked"
    with pytest.raises(ShardtuneError, match="liger"):
        loss_backend(torch.device("cpu"), "liger")
    with pytest.raises(ShardtuneError, match="unknown loss backend"):
        loss_backend(torch.device("cpu"), "fast")
    assert default_chunk_tokens(49152) == 341


# ---------------------------------------------------------------- inside a real model


def _tiny_llama(tokenizer_dir, tie=True):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def _batch(tok, corpus):
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:4]]
    batch = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[1, :6] = -100  # a prompt without loss, as in SFT
    return dict(batch), labels


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_a_tiny_llama_gets_the_same_gradients_as_from_model_loss(tiny_lm_tokenizer, lm_corpus, tie):
    model, tok = _tiny_llama(tiny_lm_tokenizer, tie)
    batch, labels = _batch(tok, lm_corpus)
    keys = sorted(model.state_dict())
    model(**batch, labels=labels).loss.backward()
    ref_loss = model(**batch, labels=labels).loss.item()
    reference = _grads(model)

    head = install_chunked_head(model, chunk_tokens=7)
    assert isinstance(model.lm_head, ChunkedLMHead) and install_chunked_head(model) is head
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert sorted(model.state_dict()) == keys
    with head.loss_for(labels) as lm:
        out = model(**batch)
    loss_sum, tokens = lm.result(out)
    (loss_sum / tokens).backward()
    assert abs((loss_sum / tokens).item() - ref_loss) <= 1e-6 * ref_loss
    chunked = _grads(model)
    assert chunked.keys() == reference.keys()
    for name in reference:
        assert _close(chunked[name], reference[name]), name


def test_a_lora_wrapped_llama_gets_the_same_adapter_gradients(tiny_lm_tokenizer, lm_corpus):
    """SFT with LoRA: the head can be installed through the PEFT wrapper (lm_head is not an adapter target)."""
    import copy

    import peft

    base, tok = _tiny_llama(tiny_lm_tokenizer)
    batch, labels = _batch(tok, lm_corpus)
    lcfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(1)
    plain = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lcfg))
    torch.manual_seed(1)
    chunked = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lcfg))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B starts at zero, which would leave A without gradient: give both copies the same B
        for (n, p), (_, q) in zip(plain.named_parameters(), chunked.named_parameters()):
            if "lora_B" in n:
                q.copy_(p.copy_(torch.randn(p.shape, generator=g) * 0.02))
    head = install_chunked_head(chunked)
    assert chunked.get_output_embeddings() is head
    plain(**batch, labels=labels).loss.backward()
    with head.loss_for(labels) as lm:
        out = chunked(**batch)
    loss_sum, tokens = lm.result(out)
    (loss_sum / tokens).backward()
    trained = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    grads = dict(chunked.named_parameters())
    for n, p in plain.named_parameters():
        if p.requires_grad:
            assert _close(grads[n].grad, p.grad), n


def test_generation_and_eval_loss_are_unchanged_with_the_head_installed(tiny_lm_tokenizer, lm_corpus):
    model, tok = _tiny_llama(tiny_lm_tokenizer)
    batch, labels = _batch(tok, lm_corpus)
    prompt = tok("the film is", return_tensors="pt")
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        before = model.generate(**prompt, **gen), model(**batch, labels=labels).loss
    head = install_chunked_head(model)
    with torch.no_grad():
        after = model.generate(**prompt, **gen), model(**batch, labels=labels).loss
        with head.loss_for(labels) as lm:  # the eval path through the chunked loss: no logits, no gradients
            loss_sum, tokens = lm.result(model(**batch))
    assert torch.equal(before[0], after[0])
    assert before[1].item() == after[1].item()
    assert abs((loss_sum / tokens).item() - before[1].item()) <= 1e-6 * before[1].item()


def test_misuse_is_caught(tiny_lm_tokenizer, lm_corpus):
    model, tok = _tiny_llama(tiny_lm_tokenizer)
    batch, labels = _batch(tok, lm_corpus)
    head = install_chunked_head(model)
    with head.loss_for(labels) as lm:
        model(**batch)
        with pytest.raises(RuntimeError, match="twice"):
            model(**batch)
    with head.loss_for(labels) as lm:
        with pytest.raises(RuntimeError, match="logits_to_keep"):
            model(**batch, logits_to_keep=1)
    with head.loss_for(labels) as lm:
        with pytest.raises(RuntimeError, match="never called"):
            lm.result(None)
    with pytest.raises(RuntimeError, match="nest"):
        with head.loss_for(labels), head.loss_for(labels):
            pass


def test_models_that_rescale_logits_are_refused(tiny_lm_tokenizer):
    model, _ = _tiny_llama(tiny_lm_tokenizer)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ShardtuneError, match="final_logit_softcapping"):
        install_chunked_head(model)


# ---------------------------------------------------------------- under the distributed strategies (2 gloo ranks)


def test_ddp_fsdp2_and_zero3_give_the_full_batch_gradients(tiny_lm_tokenizer, tmp_path):
    """The head is installed before wrapping; ZeRO-3 and FSDP2 gather / unshard its weight only inside its own
    forward, and hook the output (the loss sum) for backward."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from forklaunch import free_port

    out = tmp_path / "result.json"
    worker = Path(__file__).with_name("losses_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(worker), str(tiny_lm_tokenizer), str(out), "ddp,fsdp2,zero3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for name in ("ddp", "fsdp2", "zero3"):
        r = result[name]
        assert r["params"] > 0 and r["tokens"] > 0
        assert abs(r["loss"] - result["reference_loss"]) <= 1e-6 * result["reference_loss"], (name, r)
        assert r["max_rel_diff"] <= 1e-6, (name, r)
