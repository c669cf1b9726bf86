"""How far to trust a heatmap: faithfulness and localisation metrics, batched in torch.

Every metric takes the maps the engine returns, the (B, 3, S, S) normalised model
inputs they explain and one target class per map. Perturbed inputs of all maps,
steps and images of a batch are flattened into one stream and run in chunks under
`torch.inference_mode()`; nothing loops over images in Python.

Conventions (README, "How faithful is each map?"):

* A map is a CAM-family map (B, h, w) in [0, 1], or an input gradient (B, 3, S, S)
  reduced to max_c |g_c| (Simonyan et al. 2014) and divided by its maximum.
* Perturbation metrics work where the model looks: on the normalised input, the
  whole image resized to S x S (no crop), with the map upsampled bilinearly to S x S.
  "Zero" is zero of the *normalised* input (the dataset mean colour, grey for
  Lite0), as in RISE's reference code, pytorch-grad-cam and torchcam.
* Scores are the target class's softmax probability.
* Localisation metrics work in original-image pixels: the map is upsampled bilinearly
  (pixel centres aligned, as the written overlays and .npy maps) to each image's
  own size. A box [x0, y0, x1, y1] covers the pixels x0 <= x <= x1, y0 <= y <= y1
  (inclusive, PASCAL VOC style, as samples/labels.json).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.choices import SUBSTRATES
from camcli.engine import Explanation, frozen
from camcli.errors import OptionError

METRIC_NAMES = (
    "deletion_auc",
    "insertion_auc",
    "average_drop",
    "increase_in_confidence",
    "pointing_game",
    "energy_in_box",
    "road_morf",
    "road_lerf",
)
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's ROAD*Average thresholds
# Noisy linear imputation (Rong et al. 2022): a removed pixel is the weighted mean of its 8
# neighbours, 1/6 for the 4 direct ones and 1/12 for the diagonals, plus Gaussian noise.
_ROAD_KERNEL = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
ROAD_NOISE = 0.01
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels, inclusive


@dataclass(frozen=True)
class MetricOptions:
    steps: int = 20  # deletion/insertion curve points: steps + 1, at k/steps of the pixels
    substrate: str = "zero"  # what deletion puts in place of removed pixels
    tolerance: float = 15.0  # pointing game: pixels (Zhang et al. 2016)
    chunk_size: int = 32  # perturbed inputs per forward
    road: bool = False  # --road: also ROAD (18 imputed inputs per map, each a sparse solve)

    def __post_init__(self) -> None:
        if self.substrate not in SUBSTRATES:
            raise OptionError(
                f"unknown {{substrate}} {self.substrate!r}; use one of {', '.join(SUBSTRATES)}", "substrate"
            )
        if self.steps < 1:
            raise OptionError(f"{{steps}} must be at least 1, not {self.steps}", "steps")


# -- maps ------------------------------------------------------------------------------


def saliency(maps: Tensor) -> Tensor:
    """(B, h, w) non-negative maps with maximum 1 (all zeros where a map is flat)."""
    if maps.ndim == 4:  # input gradient: Simonyan et al.'s max over colour channels of |g|
        maps = maps.abs().amax(1)
    maps = maps.float().clamp(min=0).nan_to_num(0.0)
    peak = maps.flatten(1).amax(1).clamp(min=torch.finfo(torch.float32).tiny)
    return maps / peak[:, None, None]


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, *size), bilinear with pixel centres aligned."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _interpolation_matrix(source: int, sizes: Tensor, length: int) -> Tensor:
    """(B, length, source) rows that resample a `source`-long axis to each sizes[b]
    exactly as F.interpolate(mode="bilinear", align_corners=False); rows >= sizes[b] are 0."""
    out = torch.arange(length, device=sizes.device, dtype=torch.float32)[None, :]
    scale = source / sizes.to(torch.float32)[:, None]
    position = ((out + 0.5) * scale - 0.5).clamp(min=0)
    low = position.floor().long().clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    frac = (position - low).clamp(max=1.0)
    matrix = torch.zeros(sizes.shape[0], length, source, device=sizes.device)
    matrix.scatter_add_(2, low[..., None], (1 - frac)[..., None])
    matrix.scatter_add_(2, high[..., None], frac[..., None])
    return matrix * (out < sizes[:, None])[..., None]


def resize_to_images(maps: Tensor, sizes: Tensor) -> Tensor:
    """(B, h, w) maps -> (B, Hmax, Wmax): map b at its image's (height, width) = sizes[b],
    zero beyond. Bilinear resampling is separable, so one batched matmul per axis
    resizes every map to its own size."""
    h, w = maps.shape[-2:]
    rows = _interpolation_matrix(h, sizes[:, 0], int(sizes[:, 0].max()))
    cols = _interpolation_matrix(w, sizes[:, 1], int(sizes[:, 1].max()))
    return rows @ maps.float() @ cols.transpose(1, 2)


# -- substrates ------------------------------------------------------------------------


def blur(inputs: Tensor) -> Tensor:
    """RISE's blurred copy: a Gaussian of sigma 5 px in an 11 px kernel at 224 px,
    both scaled with the input size."""
    import torchvision.transforms.v2.functional as TF  # only for the blur substrate

    scale = inputs.shape[-1] / 224
    kernel = 2 * max(1, round(5 * scale)) + 1
    return TF.gaussian_blur(inputs, kernel_size=[kernel, kernel], sigma=[5.0 * scale, 5.0 * scale])


def substrate(inputs: Tensor, kind: str) -> Tensor:
    """What deletion puts in place of a removed pixel, on the normalised input:
    zero (the dataset mean colour), blur (the blurred image) or mean (the image's
    own mean colour, per channel)."""
    if kind == "zero":
        return torch.zeros_like(inputs)
    if kind == "blur":
        return blur(inputs)
    if kind == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    raise OptionError(f"unknown {{substrate}} {kind!r}; use one of {', '.join(SUBSTRATES)}", "substrate")


# -- faithfulness ----------------------------------------------------------------------


def target_probabilities(
    forward: Callable[[Tensor], Tensor],
    count: int,
    build: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk_size: int,
) -> Tensor:
    """Softmax probability of targets[r] on input build(r), for r < count, in chunks."""
    probabilities = []
    rows = torch.arange(count, device=targets.device)
    with torch.inference_mode():
        for chunk in rows.split(chunk_size):
            logits = forward(build(chunk)).float()
            probabilities.append(logits.softmax(1).gather(1, targets[chunk, None]).squeeze(1))
    return torch.cat(probabilities) if probabilities else targets.new_zeros(0, dtype=torch.float32)


def salience_ranks(maps: Tensor) -> Tensor:
    """(M, H, W) -> (M, H, W) position of each pixel in descending map order (0 = most
    salient); equal values keep row-major order, so curves are deterministic."""
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return ranks.view_as(maps)


def perturbation_curves(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    sample: Tensor,
    targets: Tensor,
    options: MetricOptions,
    clean: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Deletion and insertion curves (Petsiuk et al. 2018), each (M, steps + 1).

    Map m explains inputs[sample[m]] for class targets[m]; maps are (M, S, S). Point k
    of a curve is the target's probability after the n_k = floor(k * S^2 / steps)
    most salient pixels are changed: deletion replaces them by the substrate (k = 0:
    the image itself), insertion copies them from the image into its blurred copy
    (k = steps: the image itself). `clean`: the (M,) probabilities on the images, if known.
    """
    steps = options.steps
    count, (height, width) = maps.shape[0], inputs.shape[-2:]
    pixels = height * width
    ranks = salience_ranks(maps).unsqueeze(1)  # (M, 1, S, S)
    removed = substrate(inputs, options.substrate)
    blurred = blur(inputs)

    def build(rows: Tensor) -> Tensor:
        deleting = rows < count * steps
        local = rows % (count * steps)
        m, j = local // steps, local % steps
        k = torch.where(deleting, j + 1, j)  # deletion: steps 1..N, insertion: 0..N-1
        changed = ranks[m] < ((k * pixels) // steps)[:, None, None, None]
        b = sample[m]
        deleted = torch.where(changed, removed[b], inputs[b])
        inserted = torch.where(changed, inputs[b], blurred[b])
        return torch.where(deleting[:, None, None, None], deleted, inserted)

    row_targets = targets.repeat_interleave(steps).repeat(2)
    probs = target_probabilities(forward, 2 * count * steps, build, row_targets, options.chunk_size)
    if clean is None:
        clean = target_probabilities(forward, count, lambda r: inputs[sample[r]], targets, options.chunk_size)
    deletion = torch.cat([clean[:, None], probs[: count * steps].view(count, steps)], dim=1)
    insertion = torch.cat([probs[count * steps :].view(count, steps), clean[:, None]], dim=1)
    return deletion, insertion


def noisy_linear_imputation(
    inputs: Tensor, removed: Tensor, noise: float = ROAD_NOISE, generator: torch.Generator | None = None
) -> Tensor:
    """ROAD's imputation (Rong et al., ICML 2022): the removed pixels (removed: (N, H, W)
    bool) of inputs (N, C, H, W) solve x_i = sum_j w_ij x_j / sum_j w_ij over the
    in-image neighbours j (known ones fixed), channel by channel, then get noise * N(0, 1).
    The sparse system is symmetric positive definite where any pixel is known; it is
    solved for all images at once by conjugate gradients with the diagonal as
    preconditioner (one 3x3 stencil per iteration), to a relative residual of 1e-5."""
    n, channels, height, width = inputs.shape
    missing = removed[:, None].to(torch.float32).expand(n, channels, height, width)
    missing = missing.reshape(n * channels, 1, height, width)
    values = inputs.to(torch.float32).reshape(n * channels, 1, height, width)

    def neighbours(t: Tensor) -> Tensor:  # the 3x3 weighted sum as 8 shifted adds (zero outside)
        padded = F.pad(t, (1, 1, 1, 1))
        total = torch.zeros_like(t)
        for dy in range(3):
            for dx in range(3):
                if _ROAD_KERNEL[dy][dx]:
                    total += _ROAD_KERNEL[dy][dx] * padded[..., dy : dy + height, dx : dx + width]
        return total

    weight_sum = neighbours(torch.ones_like(values[:1]))  # less than 1 at the border

    def operator(x: Tensor) -> Tensor:
        return missing * (weight_sum * x - neighbours(missing * x))

    b = missing * neighbours(values * (1 - missing))
    x = torch.zeros_like(values)
    r = b.clone()
    z = r / weight_sum
    p = z.clone()
    rz = (r * z).sum((1, 2, 3), keepdim=True)
    limit = 1e-10 * (b * b).sum((1, 2, 3), keepdim=True)
    for _ in range(4 * (height + width)):
        if bool(((r * r).sum((1, 2, 3), keepdim=True) <= limit).all()):
            break
        ap = operator(p)
        step = rz / (p * ap).sum((1, 2, 3), keepdim=True).clamp(min=1e-30)
        x = x + step * p
        r = r - step * ap
        z = r / weight_sum
        rz_next = (r * z).sum((1, 2, 3), keepdim=True)
        p = z + rz_next / rz.clamp(min=1e-30) * p
        rz = rz_next
    filled = values * (1 - missing) + missing * x
    jitter = torch.randn(filled.shape, generator=generator, dtype=torch.float32).to(filled.device)
    filled = filled + missing * noise * jitter
    return filled.reshape(n, channels, height, width).to(inputs.dtype)


def road_scores(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    sample: Tensor,
    targets: Tensor,
    chunk_size: int = 32,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    seed: int = 0,
    noise: float = ROAD_NOISE,
) -> tuple[Tensor, Tensor]:
    """ROAD, Rong et al., ICML 2022, per map: the mean over `percentiles` p of the target's
    probability after removing (by noisy linear imputation) the (100 - p) % most relevant
    pixels (MoRF, lower is better) and the (100 - p) % least relevant (LeRF, higher is
    better), as pytorch-grad-cam's ROADMostRelevantFirstAverage / ROADLeastRelevantFirstAverage
    (there the 1 - map's percentiles). Ties are broken by rank, so exactly that share is removed.
    maps (M, S, S) in [0, 1]; the M x 2 x P imputed inputs run in chunks without autograd."""
    count, (height, width) = maps.shape[0], maps.shape[-2:]
    pixels = height * width
    generator = torch.Generator().manual_seed(seed)
    most = salience_ranks(maps)  # 0 = most relevant
    least = pixels - 1 - most
    shares = torch.tensor([(100 - p) / 100 for p in percentiles], device=maps.device)
    removed_counts = (shares * pixels).round().long()  # (P,)
    results = []
    for ranks in (most, least):
        masks = ranks[:, None] < removed_counts[None, :, None, None]  # (M, P, S, S)
        flat_masks = masks.flatten(0, 1)
        rows = torch.arange(count, device=maps.device).repeat_interleave(len(percentiles))
        probabilities = []
        for chunk in torch.arange(len(rows), device=maps.device).split(chunk_size):
            with torch.inference_mode():
                imputed = noisy_linear_imputation(inputs[sample[rows[chunk]]], flat_masks[chunk], noise, generator)
            probabilities.append(
                target_probabilities(forward, len(chunk), lambda r, x=imputed: x[r], targets[rows[chunk]], chunk_size)
            )
        results.append(torch.cat(probabilities).view(count, len(percentiles)).mean(1))
    return results[0], results[1]


def area_under_curve(curve: Tensor) -> Tensor:
    """Trapezoid rule over x = k / steps in [0, 1] (so a constant curve p has area p);
    probabilities are not divided by the clean image's."""
    steps = curve.shape[1] - 1
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) / steps


def confidence_change(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    maps: Tensor,
    sample: Tensor,
    targets: Tensor,
    chunk_size: int = 32,
    clean: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chattopadhyay et al. 2018, per map: (average drop term, increase in confidence).

    Y = p_c(image), O = p_c(image * map) on the normalised input, map (M, S, S) in
    [0, 1]. Average drop = max(0, Y - O) / Y and increase = [Y < O]; their means
    over images, x100, are the paper's "Average Drop %" and "% Increase in Confidence".
    `clean`: the (M,) probabilities Y, if known.
    """
    if clean is None:
        clean = target_probabilities(forward, maps.shape[0], lambda r: inputs[sample[r]], targets, chunk_size)
    masked = target_probabilities(
        forward, maps.shape[0], lambda r: inputs[sample[r]] * maps[r, None], targets, chunk_size
    )
    drop = (clean - masked).clamp(min=0) / clean.clamp(min=torch.finfo(torch.float32).tiny)
    return drop, masked > clean


# -- localisation ----------------------------------------------------------------------


def box_tensor(boxes: Sequence[Sequence[Box]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Per-image box lists -> (B, K, 4) boxes and (B, K) validity, padded to the most boxes."""
    most = max((len(b) for b in boxes), default=0)
    coords = torch.zeros(len(boxes), max(most, 1), 4, dtype=torch.float32)
    valid = torch.zeros(len(boxes), max(most, 1), dtype=torch.bool)
    for i, image_boxes in enumerate(boxes):  # parsing host lists once per batch, no tensor work
        if image_boxes:
            coords[i, : len(image_boxes)] = torch.tensor(image_boxes, dtype=torch.float32)
            valid[i, : len(image_boxes)] = True
    return coords.to(device), valid.to(device)


def box_masks(boxes: Tensor, valid: Tensor, height: int, width: int) -> Tensor:
    """(B, height, width): True on pixels inside any valid box (inclusive corners)."""
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    inside_y = (ys >= y0) & (ys <= y1) & valid[..., None]  # (B, K, H)
    inside_x = (xs >= x0) & (xs <= x1)  # (B, K, W)
    masks = torch.zeros(boxes.shape[0], height, width, dtype=torch.bool, device=boxes.device)
    for k in range(boxes.shape[1]):  # box slots, not images: memory stays at one (B, H, W)
        masks |= inside_y[:, k, :, None] & inside_x[:, k, None, :]
    return masks


def pointing_game(maps: Tensor, boxes: Tensor, valid: Tensor, tolerance: float = 15.0) -> Tensor:
    """Zhang et al. 2016: True where the map's maximum (the first in row-major order)
    lies closer than `tolerance` px to a box, as TorchRay's PointingGame (a disk of
    radius `tolerance` around the point must touch a box pixel). maps (B, H, W) in
    image pixels; a map without any positive value is a miss."""
    height, width = maps.shape[-2:]
    peak = maps.flatten(1).argmax(1)
    v, u = (peak // width).float()[:, None], (peak % width).float()[:, None]
    x0, y0, x1, y1 = boxes.unbind(-1)
    dx = torch.maximum(torch.maximum(x0 - u, u - x1), torch.zeros_like(x0))
    dy = torch.maximum(torch.maximum(y0 - v, v - y1), torch.zeros_like(y0))
    near = (dx**2 + dy**2 < tolerance**2) & valid
    return near.any(1) & (maps.flatten(1).amax(1) > 0)


def energy_in_box(maps: Tensor, masks: Tensor) -> Tensor:
    """Fraction of each map's mass inside its boxes (0 for a map without mass)."""
    total = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


# -- one batch -------------------------------------------------------------------------


def evaluate_batch(
    model: nn.Module,
    inputs: Tensor,
    explanations: Sequence[Explanation],
    image_sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Sequence[Box] | None] | None,
    options: MetricOptions,
    logits: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Every metric for every explanation of a batch: one dict of (B,) float tensors
    per explanation, in its order. Box metrics are NaN for images without boxes;
    pointing_game is 1.0 (hit) or 0.0 (miss). `logits`: the clean batch's, when the
    caller has them already (the engine does), so the clean forward is not run twice."""
    if not explanations:
        return []
    batch, size = inputs.shape[0], tuple(inputs.shape[-2:])
    device = inputs.device
    native = [saliency(e.maps.to(device)) for e in explanations]
    model_maps = torch.cat([upsample(m, size) for m in native])  # (E * B, S, S)
    sample = torch.arange(batch, device=device).repeat(len(explanations))
    targets = torch.cat([e.targets.to(device) for e in explanations])
    with frozen(model):
        if logits is not None:
            probabilities = logits.to(device).float().softmax(1)
        else:
            with torch.inference_mode():  # one clean forward per image, shared by every map
                chunks = inputs.split(options.chunk_size)
                probabilities = torch.cat([model(chunk).float().softmax(1) for chunk in chunks])
        clean = probabilities[sample, targets]
        deletion, insertion = perturbation_curves(model, inputs, model_maps, sample, targets, options, clean)
        drop, increase = confidence_change(model, inputs, model_maps, sample, targets, options.chunk_size, clean)
        if options.road:
            morf, lerf = road_scores(model, inputs, model_maps, sample, targets, options.chunk_size)
    results = {
        "deletion_auc": area_under_curve(deletion),
        "insertion_auc": area_under_curve(insertion),
        "average_drop": drop,
        "increase_in_confidence": increase.float(),
    }
    if options.road:
        results |= {"road_morf": morf, "road_lerf": lerf}
    per_explanation = [
        {name: v[i * batch : (i + 1) * batch] for name, v in results.items()} for i in range(len(native))
    ]
    if boxes is not None:
        has_boxes = torch.tensor([bool(b) for b in boxes], device=device)
        sizes = torch.tensor(image_sizes, device=device)
        coords, valid = box_tensor([b or [] for b in boxes], device)
        nan = torch.full((batch,), float("nan"), device=device)
        masks = None
        for metrics, maps in zip(per_explanation, native, strict=True):
            image_maps = resize_to_images(maps, sizes)
            if masks is None:
                masks = box_masks(coords, valid, *image_maps.shape[-2:])
            hit = pointing_game(image_maps, coords, valid, options.tolerance).float()
            metrics["pointing_game"] = torch.where(has_boxes, hit, nan)
            metrics["energy_in_box"] = torch.where(has_boxes, energy_in_box(image_maps, masks), nan)
    return per_explanation
