"""KV-cache decoding (greedy or sampled) with megatron-core's own static KV cache.

The prompt batch is embedded once through the VLM's own ``embed`` (token embeddings with the image features at the
image tokens, exactly as in training), then fed to the decoder (megatron's ``GPTModel``) with a
:class:`megatron.core.inference.contexts.StaticInferenceContext`: megatron's attention writes each layer's keys and
values into the context's buffers and reads the whole prefix back, RoPE positions follow the context's
``sequence_len_offset``, and only the last position's logits are computed (``materialize_only_last_token_logits``).

Prompts of different lengths share one cache the way megatron's static engine does it: the common prefix (the
shortest prompt) is prefilled in one forward, then every row advances one position per step; a row still inside its
prompt is fed its own next prompt embedding (which may be an image feature) and ignores the sampled token. So no
position ever attends to padding and the result per row equals decoding that row alone.

Works at any tensor-parallel size (every TP rank runs the loop; the gathered logits are identical, and rank 0 of the
TP group broadcasts the chosen tokens so that sampling cannot drift). Pipeline parallelism is not supported here:
load a checkpoint at PP=1 (dist_checkpointing reshards).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax); otherwise logits are divided by the
    temperature, cut to the ``top_k`` largest (0: all) and to the smallest set whose probability reaches ``top_p``
    (1.0: all), and one token is drawn with a generator seeded by ``seed`` (None: a random seed)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """``tokens[i]``: the new ids of prompt i (EOS not included); ``finish[i]``: ``"eos"`` or ``"length"``;
    ``logits``: with ``return_logits``, one ``(b, vocab)`` fp32 tensor per step (step k predicts new token k of
    every row that is past its prompt); ``prefill_s``/``decode_s``: wall times of the prefill and of the steps."""

    tokens: list[list[int]]
    finish: list[str]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``(b, v)`` logits with everything outside the top-k / nucleus set to -inf (at least one token is kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from ``(b, v)`` fp32 logits: ``(b,)`` long."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _tp_broadcast(tokens: torch.Tensor) -> torch.Tensor:
    """Every TP rank takes TP rank 0's tokens (they agree already; this keeps sampling from ever drifting)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return tokens
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tokens
    src = parallel_state.get_tensor_model_parallel_src_rank()
    torch.distributed.broadcast(tokens, src, group=parallel_state.get_tensor_model_parallel_group())
    return tokens


@torch.no_grad()
def generate(model, prompts: list[torch.Tensor], images: torch.Tensor | None, max_new_tokens: int,
             eos_id: int | None, sampling: Sampling | None = None, vocab_size: int | None = None,
             pad_id: int = 0, return_logits: bool = False, image_grid: torch.Tensor | None = None,
             on_token=None) -> Generation:
    """Decode up to ``max_new_tokens`` new tokens after each prompt, stopping a row at ``eos_id`` (None: never).

    ``model``: the VLM (TP any, PP=1), in eval mode. ``prompts``: unpadded id tensors with every ``<image>`` already
    expanded to the image-token count; ``images``: uint8 ``(n, H, W, c)`` or normalized ``(n, c, H, W)``, one per
    image in prompt order (None for text only); native resolution: the images' patches, with their grids
    ``image_grid`` ``(n, 3)``. ``vocab_size``: logits past it (vocabulary padding) are never chosen (default: the
    model's embedding rows).

    With multimodal rotary positions (M-RoPE) every forward gets the position ids of the whole prefix so far:
    megatron's static-batching attention keeps keys un-rotated in its cache and rotates ``k[:end]`` and
    ``q[start:end]`` with slices of the rotary table it is given; a row's new tokens continue one past its prompt's
    largest position (``data/mrope.py``).
    ``on_token(row, token)``: called with each new token of a row as it is chosen (streaming); returning True ends
    that row there (finish ``"stop"``), e.g. at a stop string or the row's own token limit.
    """
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    vlm = _unwrap(model)
    if not (vlm.pre_process and vlm.post_process):
        raise ValueError("KV-cache generation runs the whole model in one pipeline stage; load it at PP=1")
    sampling = sampling or Sampling()
    sampling.check()
    vocab = vocab_size or vlm.vocab_size
    b = len(prompts)
    if b == 0 or max_new_tokens < 1:
        return Generation([[] for _ in prompts], ["length"] * b)
    lengths = [int(p.numel()) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    device = next(vlm.parameters()).device
    width = max(lengths)
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : lengths[i]] = p.to(device)
    if images is not None:
        images = images.to(device)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2 ** 63))

    lm = vlm.language_model
    ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=width + max_new_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * b
    done = [False] * b
    step_logits: list[torch.Tensor] = []
    lens = torch.tensor(lengths, device=device)

    positions = None
    if getattr(vlm, "mrope", False):
        from ..data.mrope import continue_positions

        positions = continue_positions(vlm.position_ids(ids, image_grid), lengths, width + max_new_tokens)

    def forward(decoder_input: torch.Tensor) -> torch.Tensor:
        end = ctx.sequence_len_offset + decoder_input.shape[0]
        logits = lm(input_ids=None, position_ids=None if positions is None else positions[:, :, :end],
                    attention_mask=None, decoder_input=decoder_input, inference_context=ctx,
                    runtime_gather_output=True)  # (b, 1, padded vocab)
        ctx.increment_sequence_len_offset(decoder_input.shape[0])
        return logits[:, -1, :vocab].float()

    with InferenceMode.active():
        t0 = time.perf_counter()
        prompt_emb = (vlm.embed(ids, images, image_grid) if image_grid is not None
                      else vlm.embed(ids, images))  # (width, b, h): image features in place
        pos = min(lengths)
        logits = forward(prompt_emb[:pos])
        if logits.is_cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        ctx.enable_decode_mode()
        while True:
            if return_logits:
                step_logits.append(logits)
            nxt = _tp_broadcast(choose(logits, sampling, generator).to(torch.long).contiguous())
            in_prompt = lens > pos  # rows still reading their prompt: the token is the prompt's, not chosen
            chosen = nxt.tolist()  # one device sync per step
            for i in range(b):
                if done[i] or pos < lengths[i]:
                    continue
                t = chosen[i]
                if eos_id is not None and t == eos_id:
                    done[i], finish[i] = True, "eos"
                    continue
                out[i].append(t)
                if on_token is not None and on_token(i, t):
                    done[i], finish[i] = True, "stop"
                elif len(out[i]) >= max_new_tokens:
                    done[i] = True
            if all(done):
                break
            emb = lm.embedding(input_ids=nxt.unsqueeze(1), position_ids=None)  # (1, b, h)
            if bool(in_prompt.any()):
                emb = torch.where(in_prompt.view(1, b, 1), prompt_emb[pos: pos + 1], emb)
            logits = forward(emb)
            pos += 1
        t2 = time.perf_counter()
    return Generation(out, finish, prefill_s=t1 - t0, decode_s=t2 - t1, logits=step_logits)

