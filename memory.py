"""How much memory a training step takes, and the micro-batch that fits the card: estimated at start-up from
fake tensors (every tensor a step makes, sized without computing anything), then confirmed by running the worst
case first; and the DataLoader's bytes in flight against /dev/shm. main.py uses them before its first step;
bench.py --parts memory prints the estimates for 16, 24, 48 and 80 GB cards.
"""

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from data import collate, packed_batch, to_device
from model import TinyVLM, autocast
from sources import IGNORE_INDEX

MARGIN = 1.25  # a micro-batch fits when its estimate, 25% more, fits: the allocator's rounding and cache, the
# CUDA context, kernels' workspaces and what the estimate leaves out (bench.py --parts memory)


class DoesNotFit(RuntimeError):
    """No micro-batch of the run's settings fits the device: the message says what to change. main.py prints it
    and exits with status 1, before any data loads or after the worst case ran out of memory."""


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by the tensors created inside it (their storages, each counted once). The
    storages that died are only looked for when the total, dead ones included, tops the peak so far."""

    def __init__(self):
        super().__init__()
        self.alive, self.total, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            known = self.alive.get(storage._cdata)
            if known is None or known[0].expired():  # new, or at the address of one that died
                self.total += storage.nbytes() - (known[1] if known else 0)
                self.alive[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        if self.total > self.peak:
            self.alive = {key: (ref, size) for key, (ref, size) in self.alive.items() if not ref.expired()}
            self.total = sum(size for _, size in self.alive.values())
            self.peak = max(self.peak, self.total)
        return out


@contextmanager
def fewer_layers(model: TinyVLM, lm_layers: int):
    """The model with its language model cut to its first lm_layers decoder layers and its vision encoder to
    one layer, put back whole on leaving."""
    decoder, encoder = model.lm.get_decoder(), model.vision
    lm_all, vision_all = decoder.layers, encoder.layers
    vision_owner = getattr(encoder.model, "vision_model", encoder.model).encoder
    vision_name = "layers" if hasattr(vision_owner, "layers") else "layer"
    decoder.layers = lm_all[:lm_layers]
    setattr(vision_owner, vision_name, vision_all[:1])
    try:
        yield
    finally:
        decoder.layers = lm_all
        setattr(vision_owner, vision_name, vision_all)


def peak_bytes(model: TinyVLM, micro_batch: dict, device: torch.device, dtype: torch.dtype) -> float:
    """Peak bytes of the tensors one forward and backward of micro_batch makes, the gradients of what trains
    among them, weights not included, measured without computing anything: the model runs on fake tensors
    (FakeTensorMode), which know their sizes, and LiveBytes keeps count of those alive."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    trained = [p for p in model.parameters() if p.requires_grad]
    config = model.lm.config
    implementation = config._attn_implementation
    if implementation == "sdpa_varlen":  # it reads the bounds off the data, which fake tensors do not hold
        config._attn_implementation = "varlen"  # and keeps for the backward pass what varlen keeps
    try:
        with torch.compiler.set_stance("force_eager"), FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as live:
            with autocast(device, dtype):
                loss = model(**to_device(micro_batch, device))
            torch.autograd.grad(loss / max(micro_batch["num_targets"], 1), trained)
    finally:
        config._attn_implementation = implementation
    return live.peak


def activation_bytes(model: TinyVLM, micro_batch: dict, device: torch.device, dtype: torch.dtype) -> float:
    """peak_bytes of the whole model, in seconds instead of tens of them: measured with the language model cut
    to two and to four layers and extrapolated to all of them (each decoder layer keeps the same tensors for
    the backward pass; with fewer layers the peak may lie elsewhere, in the images' encoder and projector, and
    not grow with them yet), the vision encoder cut to one layer (it runs without gradients, so its peak is
    one layer's, whatever its depth). tests/test_memory.py checks the extrapolation against the whole model."""
    layers = len(model.lm.get_decoder().layers)
    if layers <= 4:
        with fewer_layers(model, layers):
            return peak_bytes(model, micro_batch, device, dtype)
    with fewer_layers(model, 2):
        two = peak_bytes(model, micro_batch, device, dtype)
    with fewer_layers(model, 4):
        four = peak_bytes(model, micro_batch, device, dtype)
    return four + (layers - 4) * (four - two) / 2


def state_bytes(model: TinyVLM, world_size: int = 1) -> float:
    """What a run holds besides a micro-batch's activations: the weights, a float32 gradient and AdamW's two
    float32 moments for each trained weight, and under DistributedDataParallel its gradient buckets."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weights + trained * 4 * (3 + (world_size > 1))


# ----------------------------------------------------------------------------------------------------------
# The worst micro-batch a run can meet


@dataclass(frozen=True)
class Layout:
    """How a run's micro-batches are shaped: padded (one sample per row, the micro-batch a number of samples)
    or packed (the micro-batch a number of token slots: one row of them under varlen attention, rows as wide
    as the longest sample under a block-diagonal mask); the most samples a process takes in a step."""

    packed: bool
    one_row: bool  # packed: the micro-batch is one row (varlen attention)
    max_length: int  # the longest a sample may be, in tokens
    samples_per_step: int  # samples per process and optimizer step

    def sizes(self) -> list[int]:
        """The micro-batch sizes to choose from, smallest first: samples for padded batches (powers of two
        that divide the step), token slots for packed ones (multiples of 1,024 from one longest sample to the
        whole step at its longest)."""
        if not self.packed:
            return [n for n in (2**k for k in range(13)) if n <= self.samples_per_step and not self.samples_per_step % n]
        most = self.samples_per_step * self.max_length
        return sorted({self.max_length, *range(1024 * -(-self.max_length // 1024), most + 1, 1024), most})


def worst_case_batches(model: TinyVLM, layout: Layout, size: int) -> list[dict]:
    """The micro-batches of `size` (samples, or token slots when packed) among which the one that takes the most
    memory is: each sample an image, one prompt token and an answer that fills it to its length, all of whose
    tokens are targets (the LM head's float32 logits are among a step's largest tensors). Padded: samples of
    max_length. Packed: the slots filled with the fewest samples (each of max_length: the most targets), and
    with the most (as many as the step has, each no shorter than an image and two tokens: the most images).
    What a micro-batch of a given size takes grows with its targets and with its images, one for the other:
    its largest is at one of these two ends."""
    image_tokens = model.num_image_tokens
    shortest = image_tokens + 2
    pixels = torch.zeros((3, *model.processor.image_size), dtype=torch.uint8)
    text_token = model.processor.end_of_turn_id
    pad = model.processor.tokenizer.pad_token_id

    def sample(length: int) -> dict:
        input_ids = [model.image_token_id] * image_tokens + [text_token] * (length - image_tokens)
        labels = [IGNORE_INDEX] * (image_tokens + 1) + input_ids[image_tokens + 1:]
        return {"input_ids": input_ids, "labels": labels, "pixels": pixels}

    if not layout.packed:
        return [collate([sample(layout.max_length)] * size, pad, model.image_token_id)]
    rows = 1 if layout.one_row else max(1, size // layout.max_length)
    width = size // rows
    batches = []
    for samples in (max(rows, -(-size // layout.max_length)), min(layout.samples_per_step, max(rows, size // shortest))):
        per_row = -(-samples // rows)
        lengths = [max(shortest, min(layout.max_length, width // per_row + (i < width % per_row))) for i in range(per_row)]
        batches.append(packed_batch([[sample(n) for n in lengths] for _ in range(rows)], pad, model.image_token_id,
                                    layout.max_length))
    return batches


# ----------------------------------------------------------------------------------------------------------
# Choosing the micro-batch


def estimator(model: TinyVLM, layout: Layout, device: torch.device, dtype: torch.dtype, world_size: int = 1):
    """size -> the bytes a run of micro-batches of that size needs at its worst: state_bytes and the largest
    activations of worst_case_batches. Each size is measured once."""
    state = state_bytes(model, world_size)

    @lru_cache(maxsize=None)
    def estimate(size: int) -> float:
        return state + max(activation_bytes(model, batch, device, dtype)
                           for batch in worst_case_batches(model, layout, size))

    return estimate


def largest_fitting(estimate, sizes: list[int], available: float) -> int | None:
    """The largest of sizes (ascending) whose estimate, with MARGIN, fits `available` bytes; None when the
    smallest does not fit. The estimate grows with the size, almost in proportion: each guess interpolates
    between the largest size known to fit and the smallest known not to, and its neighbour settles it, so a
    handful of estimates suffices."""
    def fits(index: int) -> bool:
        return MARGIN * estimate(sizes[index]) <= available

    low, high = 0, len(sizes) - 1
    if not fits(low):
        return None
    if fits(high):
        return sizes[high]
    while high - low > 1:  # sizes[low] fits, sizes[high] does not
        share = (available / MARGIN - estimate(sizes[low])) / (estimate(sizes[high]) - estimate(sizes[low]))
        guess = min(high - 1, max(low + 1, low + int(share * (high - low))))
        if fits(guess):
            low = guess
            if guess + 1 < high and not fits(guess + 1):
                high = guess + 1
        else:
            high = guess
            if guess - 1 > low and fits(guess - 1):
                low = guess - 1
    return sizes[low]


def describe(layout: Layout, size: int) -> str:
    if layout.packed:
        return f"{size:,} token slots (packed{', one row' if layout.one_row else ''})"
    return f"{size} samples of up to {layout.max_length} tokens"


def fit_micro_batch(model: TinyVLM, layout: Layout, device: torch.device, dtype: torch.dtype, available: float,
                    where: str, world_size: int = 1) -> tuple[int, str]:
    """The largest micro-batch whose worst case fits `available` bytes with MARGIN, and one line saying what
    was chosen and why. Raises DoesNotFit, saying what to change, when not even the smallest does."""
    estimate = estimator(model, layout, device, dtype, world_size)
    sizes = layout.sizes()
    size = largest_fitting(estimate, sizes, available)
    if size is None:
        raise DoesNotFit(f"the smallest micro-batch, {describe(layout, sizes[0])}, needs an estimated "
                         f"{estimate(sizes[0]) / 1e9:.1f} GB, {MARGIN * estimate(sizes[0]) / 1e9:.1f} GB with "
                         f"{MARGIN - 1:.0%} to spare, more than the {available / 1e9:.1f} GB of {where}: lower "
                         "--max_length, or in stage 2 set --gradient_checkpointing true or --lora_rank 16")
    bound = "the whole step" if size == sizes[-1] else f"the most whose worst case fits {available / 1e9:.1f} GB"
    return size, (f"micro-batches of {describe(layout, size)}: {bound} of {where} with {MARGIN - 1:.0%} to spare "
                  f"(estimated {estimate(size) / 1e9:.1f} GB)")


def available_memory(device: torch.device) -> tuple[float, str]:
    """The bytes a run may use on the device, what it holds already included, and the device's name: a GPU's
    free memory plus what torch has allocated on it; on other devices the host's available memory."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_allocated(device)
        return free, torch.cuda.get_device_name(device)
    with open("/proc/meminfo") as f:
        available = next(float(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available, "this machine's memory"


def rehearse(model: TinyVLM, micro_batch: dict, device: torch.device, dtype: torch.dtype, extra_bytes: float) -> None:
    """One forward and backward of micro_batch (one of worst_case_batches) while extra_bytes are held besides (AdamW's
    moments, which the first optimizer step makes): an out-of-memory error, if the run is to meet one, is
    raised here, in the first minute. The gradients are dropped after: the weights are as they were."""
    room = torch.empty(int(extra_bytes), dtype=torch.uint8, device=device)
    try:
        with autocast(device, dtype):
            loss = model(**to_device(micro_batch, device))
        (loss / max(micro_batch["num_targets"], 1)).backward()
    finally:
        del room
        model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# Shared memory


def shared_memory_free(path: str = "/dev/shm") -> float | None:
    """Free bytes in /dev/shm, where DataLoader workers put the batches they hand over; None where there is none."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def fit_shared_memory(workers: int, item_bytes: float, free: float | None, prefetch: int = 2) -> tuple[int, int, str]:
    """(workers, items each prefetches, a line saying what changed, or "") so that the loader's items in
    flight, workers x prefetch of item_bytes each, fit /dev/shm's free bytes with MARGIN: fewer prefetched,
    then fewer workers, never a bus error halfway through the first batch."""
    if workers == 0 or free is None or MARGIN * workers * prefetch * item_bytes <= free:
        return workers, prefetch, ""
    fitting = int(free / (MARGIN * item_bytes))
    new_workers, new_prefetch = (workers, 1) if fitting >= workers else (fitting, 1)
    return new_workers, new_prefetch, (
        f"DataLoader: {workers} workers x {prefetch} steps of {item_bytes / 1e6:.1f} MB in flight need "
        f"{workers * prefetch * item_bytes / 1e9:.2f} GB of /dev/shm, which has {free / 1e9:.2f} GB free: "
        f"{new_workers} workers x {new_prefetch} (a container's --shm-size 16g gives it room; --num_workers sets them)")
