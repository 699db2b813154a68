"""Closed-form repairs: least squares and Optimal Brain Surgeon, computed from activation moments.

Every function here *returns* tensors and never modifies the model; the edits in ``surgery`` apply
them. Weights are in the (out, in) view of ``projections`` whatever the module stores.

Three damping knobs, each named after what it damps:
- ``hessian_damp`` (OBS): relative weight added to the diagonal of the activation second moment before it
  is inverted, so rare neurons do not get huge inverse entries (SparseGPT's ``percdamp``);
- ``shrink_to_slice`` / ``shrink_to_current``: how strongly a refitted output projection is pulled back
  towards the weights it replaces (the plain slice, or the current full weights); large = no refit;
- ``shrink_to_identity`` (ReplaceMe): how strongly a linear replacement map is pulled towards the identity,
  i.e. towards "just drop the layers".
All three are scale-free: they multiply the mean of the diagonal they are added to.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import arch, hooks, projections, streams
from .allocation import check_multiple_of, kept_width, per_layer_ratios
from .data import require_batches
from .hooks import TokenStats


def damped_least_squares(lhs: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor,
                         shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min E||t - (W' a + c)||^2 + shrink * s * ||W' - prior||^2 from moments of x = (a, 1).

    ``lhs`` = E[x x^T] (k + 1, k + 1), ``rhs`` = E[x t^T] (k + 1, out), ``prior`` (out, k); s is the mean of
    E[a_i^2]. Returns W' (out, k) and c (out,), float32.
    """
    k = prior.shape[1]
    lhs = lhs.clone()
    damping = shrink * lhs.diagonal()[:k].mean()
    lhs[:k, :k] += damping * torch.eye(k, dtype=torch.float64)
    rhs = rhs.clone()
    rhs[:k] += damping * prior.T.double()  # prior: the kept columns as they were
    solution = torch.linalg.solve(lhs, rhs)  # (k + 1, out)
    return solution[:k].T.float(), solution[k].float()


def check_gram(model: nn.Module, layers: Iterable[int], stats: dict[int, TokenStats], what: str) -> None:
    """Raise unless ``stats`` holds a Gram matrix of the right size for every layer in ``layers``."""
    for index in layers:
        layer_stats = stats.get(index)
        width = arch.mlp_parts(model, index).width
        if layer_stats is None or layer_stats.gram is None or layer_stats.gram.shape != (width, width):
            raise ValueError(f"{what} needs activation statistics with a Gram matrix for layer {index} "
                             "captured on this model: importance.collect_stats(model, calibration, gram=True)")


def refit_output(weight: torch.Tensor, bias: torch.Tensor | None, stats: TokenStats, keep: torch.Tensor,
                 shrink_to_slice: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refit of an MLP's output projection after keeping only the ``keep`` neurons.

    Minimises E|| W a + b - (W' a_keep + c) ||^2 + shrink_to_slice * s * ||W' - W_keep||^2 over the calibration
    tokens, in closed form from the second moments E[a a^T] and E[a]: the kept neurons absorb what the removed
    ones used to write, and the bias ``c`` absorbs their mean (FLAP's bias compensation is the special case
    W' = W_keep). ``weight`` is (hidden, width); returns W' (hidden, k) and c (hidden,), float32.
    """
    moment = stats.second_moment.double().cpu()  # (width, width); stats may live on the GPU
    mean = (stats.sum / stats.count).double().cpu()  # (width,)
    k = keep.numel()
    weight = weight.double().cpu()
    lhs = torch.empty(k + 1, k + 1, dtype=torch.float64)  # E[x x^T] with x = (a_keep, 1)
    lhs[:k, :k] = moment[keep][:, keep]
    lhs[:k, k] = lhs[k, :k] = mean[keep]
    lhs[k, k] = 1.0
    cross = torch.cat([moment[:, keep], mean[:, None]], dim=1)  # E[a x^T]: (width, k + 1)
    new_weight, new_bias = damped_least_squares(lhs, (weight @ cross).T, weight[:, keep], shrink_to_slice)
    return new_weight, new_bias + (bias.double().cpu().float() if bias is not None else 0.0)


def obs_keep(model: nn.Module, index: int, stats: TokenStats, n_keep: int, chunk: int = 32,
             hessian_damp: float = 1e-3) -> torch.Tensor:
    """Neurons to keep in one layer by Optimal Brain Surgeon removal of output-projection columns.

    Repeatedly removes the ``chunk`` neurons whose loss of output, ||w_j||^2 / [H^-1]_jj with H the
    (damped) second moment of the activations plus a bias column, is smallest, updating the remaining
    weights and H^-1 exactly after each removal (Hassibi & Stork 1993; structured, as in ZipLM, Kurtic et
    al. 2023). The kept set pairs with ``refit_output``, which gives the same weights.
    """
    full, inverse, width = _obs_problem(model, index, stats, hessian_damp)
    return obs_remove(full, inverse, width, n_keep, chunk)


def obs_residuals(model: nn.Module, index: int, stats: TokenStats, n_keeps: Iterable[int], chunk: int = 32,
                  hessian_damp: float = 1e-3) -> dict[int, float]:
    """The refit residual of one layer at each kept width in ``n_keeps``, in closed form (no forward pass).

    One OBS run (``obs_keep``) down to the smallest width, stopping at each of the others: removing the set D
    with the kept columns re-solved costs exactly tr(W_D [H^-1]_DD^-1 W_D^T), so the running sum is
    min E||W x - W' x_kept||^2, the mean squared error per token that the best refit of the kept neurons (and a
    bias) leaves in the layer's output (x = (a, 1), H its damped second moment). With ``chunk=1`` the stops
    do not change the path; with larger chunks a chunk is cut short at a stop. Returns {width: residual}.
    """
    full, inverse, width = _obs_problem(model, index, stats, hessian_damp)
    n_keeps = sorted({int(n) for n in n_keeps})
    if not n_keeps or n_keeps[0] < 1 or n_keeps[-1] > width:
        raise ValueError(f"kept widths must lie in [1, {width}]; got {n_keeps}")
    losses = {width: 0.0}
    obs_remove(full, inverse, width, n_keeps[0], chunk, stops=n_keeps, losses=losses)
    return {n: losses[n] for n in n_keeps}


def _obs_problem(model: nn.Module, index: int, stats: TokenStats, hessian_damp: float):
    """(output projection with a bias column (hidden, width + 1), inverse damped Hessian, width) of one layer."""
    check_gram(model, [index], {index: stats}, "OBS selection")
    width = arch.mlp_parts(model, index).width
    moment, mean = stats.second_moment.double().cpu(), (stats.sum / stats.count).double().cpu()
    hessian = torch.empty(width + 1, width + 1, dtype=torch.float64)  # features: (activations, 1)
    hessian[:width, :width] = moment + hessian_damp * moment.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    hessian[:width, width] = hessian[width, :width] = mean
    hessian[width, width] = 1.0
    out = arch.mlp_parts(model, index).output
    weight = projections.weight_out_in(out).double().cpu()
    bias = out.bias.detach().double().cpu() if out.bias is not None else torch.zeros(weight.shape[0],
                                                                                   dtype=torch.float64)
    full = torch.cat([weight, bias[:, None]], dim=1)  # (hidden, width + 1)
    return full, torch.linalg.inv(hessian), width


def obs_remove(weight: torch.Tensor, inverse: torch.Tensor, width: int, n_keep: int, chunk: int,
               stops: Iterable[int] = (), losses: dict[int, float] | None = None) -> torch.Tensor:
    """The OBS loop: drop the ``chunk`` cheapest of the first ``width`` columns at a time until ``n_keep`` remain.

    ``weight`` (out, width + 1) and ``inverse`` (width + 1, width + 1, the inverse Hessian) are updated in place;
    the last column (the bias feature) is never removed. No chunk runs past a width in ``stops``; when ``losses``
    is a dict, the cumulative output loss is stored in it at each stop (``obs_residuals``). Returns the kept
    indices, sorted.
    """
    alive = torch.ones(width, dtype=torch.bool)
    stops = sorted({int(n) for n in stops if n_keep < n < width}, reverse=True) + [n_keep]
    total = 0.0
    while int(alive.sum()) > n_keep:
        n_alive = int(alive.sum())
        target = next(n for n in stops if n < n_alive)
        candidates = alive.nonzero().squeeze(1)
        loss = weight[:, candidates].pow(2).sum(0) / inverse.diagonal()[candidates]
        drop = candidates[loss.topk(min(chunk, n_alive - target), largest=False).indices]
        block = torch.linalg.inv(inverse[drop][:, drop])  # (q, q)
        if losses is not None:
            total += float(((weight[:, drop] @ block) * weight[:, drop]).sum())
        weight -= weight[:, drop] @ block @ inverse[drop, :]
        inverse -= inverse[:, drop] @ block @ inverse[drop, :]
        alive[drop] = False
        if losses is not None and n_alive - drop.numel() == target:
            losses[target] = total
    return alive.nonzero().squeeze(1)


@torch.no_grad()
def sequential_obs(model: nn.Module, ratios: dict[int, float], calibration: list[dict], multiple_of: int = 1,
                   chunk: int = 32, hessian_damp: float = 1e-3, shrink_to_slice: float = 0.1,
                   reference: list[list[torch.Tensor]] | None = None
                   ) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """OBS selection and refit layer by layer, each layer seeing the hidden states of the model pruned so far.

    Plain OBS measures every layer on the unpruned model's activations, so each layer is repaired for inputs
    it will never see once the layers before it are pruned. Here the calibration tokens travel two streams
    (``streams.two_streams``, as in SparseGPT): the unpruned model's, and the pruned model's. At layer l the
    pruned stream gives the activations a of the (still whole) MLP, and the target is the *unpruned* model's
    output of layer l, so the kept neurons also absorb the drift the earlier layers introduced. The full
    least-squares output projection is computed, ``obs_remove`` drops neurons down to the kept width, the kept
    columns and a bias are refitted (pulled towards the original columns by ``shrink_to_slice``), and the
    pruned stream moves on. Returns ({layer: kept indices}, {layer: (weight, bias)}) for
    ``surgery.remove_mlp_neurons(model, keep, outputs=...)``. Cost: about two forward passes over the
    calibration batches (one while no layer is pruned yet), plus one (width + 1)^2 Gram matrix per pruned layer.
    ``reference``: the unpruned model's decoder-layer outputs on these batches, recorded during an earlier pass
    (``streams.recording_outputs``, e.g. around ``importance.collect_stats``): the unpruned stream is then read,
    not run, and the cost falls to about one pass.
    """
    multiple_of = check_multiple_of(multiple_of)
    require_batches(calibration, "sequential_obs", model)
    layers = arch.decoder_layers(model)
    per_layer = per_layer_ratios(ratios, range(len(layers)))
    unpruned, pruned, arguments, masks = streams.two_streams(model, calibration)
    if reference is not None:
        streams.check_reference(reference, unpruned, len(layers))
    keep_by_layer, outputs = {}, {}
    for index, layer in enumerate(layers):
        width = arch.mlp_parts(model, index).width
        n_keep = kept_width(width, per_layer[index], multiple_of)
        if reference is not None:
            unpruned = [out.to(h.device, h.dtype) for out, h in zip(reference[index], unpruned, strict=True)]
        else:
            unpruned = streams.run_layer(layer, unpruned, arguments)
        if not keep_by_layer and n_keep >= width:  # nothing pruned yet: the two streams are still one
            pruned = unpruned
            continue
        outs, activations, mids = streams.run_tapped(model, index, pruned, arguments)
        if n_keep >= width:
            pruned = outs
            continue
        gram, cross = streams.output_moments(activations, mids, unpruned, masks, block_dtype=torch.float32)
        out = arch.mlp_parts(model, index).output
        weight = projections.weight_out_in(out).double().cpu()
        bias = out.bias.detach().double().cpu() if out.bias is not None else torch.zeros(weight.shape[0],
                                                                                       dtype=torch.float64)
        original = torch.cat([weight, bias[:, None]], dim=1)  # (hidden, width + 1)
        hessian = gram.clone()
        hessian[range(width), range(width)] += hessian_damp * gram.diagonal()[:width].mean()
        rhs = cross + (hessian - gram) @ original.T  # damping pulls towards the original weights
        full = torch.linalg.solve(hessian, rhs).T.contiguous()  # best full-width output projection
        keep = obs_remove(full, torch.linalg.inv(hessian), width, n_keep, chunk)
        rows = torch.cat([keep, torch.tensor([width])])
        new_weight, new_bias = damped_least_squares(gram[rows][:, rows], cross[rows], weight[:, keep],
                                                    shrink_to_slice)
        keep_by_layer[index], outputs[index] = keep, (new_weight, new_bias)
        device = outs[0].device
        w, c = new_weight.to(device, outs[0].dtype), new_bias.to(device, outs[0].dtype)
        pruned = [mid + act[..., keep.to(device)] @ w.T + c for mid, act in zip(mids, activations, strict=True)]
    return keep_by_layer, outputs


@torch.no_grad()
def linear_replacements(model: nn.Module, runs: list[tuple[int, int]], calibration: list[dict],
                        shrink_to_identity: float = 0.01) -> dict[int, torch.Tensor]:
    """For each run of layers to remove, a (hidden, hidden) map T to fold into the MLP just before the run.

    ReplaceMe (Shopkhoev et al. 2025): with ``y`` the residual stream entering the MLP of layer
    ``first - 1``, ``m`` that MLP's output and ``target`` the output of layer ``last``, solve
    min E||y + m T - target||^2 + shrink_to_identity * s * ||T - I||^2 (s = mean E[m_i^2]; T = I means
    "just drop") in closed form. Folding T into the MLP's output projection costs no parameters, so the
    pruned model is still a stock model. Runs that start at layer 0 have no MLP before them and get no map.
    """
    spec = arch.get_spec(model)
    layers = arch.decoder_layers(model)
    wanted = {first: last for first, last in runs if first > 0}
    if not wanted:
        return {}
    require_batches(calibration, "linear_replacements", model)
    hidden = getattr(model.config, spec.hidden_key)
    moments = {f: torch.zeros(hidden, hidden, dtype=torch.float64) for f in wanted}  # sum of m m^T
    cross = {f: torch.zeros(hidden, hidden, dtype=torch.float64) for f in wanted}  # sum of m (target - y - m)^T
    count = 0
    seen: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor | None] = {"m": None}
    handles = []
    for first, last in wanted.items():
        before = layers[first - 1]

        def residual_in(module, args, first=first):
            seen[f"y{first}"] = hooks.select_tokens(args[0], mask["m"]).double()

        def mlp_out(module, args, output, first=first):
            seen[f"m{first}"] = hooks.select_tokens(hooks.hidden_of(output), mask["m"]).double()

        def block_out(module, args, output, first=first):
            m, y = seen.pop(f"m{first}"), seen.pop(f"y{first}")
            target = hooks.select_tokens(hooks.hidden_of(output), mask["m"]).double()
            moments[first] += (m.T @ m).cpu()
            cross[first] += (m.T @ (target - y - m)).cpu()

        handles.append(getattr(before, spec.norms[1]).register_forward_pre_hook(residual_in))
        handles.append(getattr(before, spec.mlp).register_forward_hook(mlp_out))
        handles.append(layers[last].register_forward_hook(block_out))
    with hooks.removing(handles):
        for batch in calibration:
            mask["m"] = batch.get("attention_mask")
            hooks.feed(model, batch)
            count += int(mask["m"].sum()) if mask["m"] is not None else batch["input_ids"].numel()
    maps = {}
    eye = torch.eye(hidden, dtype=torch.float64)
    for first in wanted:
        damping = shrink_to_identity * moments[first].diagonal().mean() / count
        lhs = moments[first] / count + damping * eye
        # minimiser of E||m (T - I) - (target - y - m)||^2 + damping ||T - I||^2, written as T = I + D
        maps[first] = (eye + torch.linalg.solve(lhs, cross[first] / count)).float()
    return maps


@torch.no_grad()
def refit_after_removal(model: nn.Module, indices: Iterable[int], calibration: list[dict],
                        shrink_to_current: float = 0.1) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """New MLP output projections for the layers that stay when ``indices`` go, so the pruned model tracks the original.

    The two-stream procedure of ``sequential_obs`` applied to depth pruning: the calibration tokens run through
    the original decoder and through the decoder without ``indices``. Each kept layer's output projection (all
    its neurons, plus a bias) is refitted by least squares (pulled towards the current weights by
    ``shrink_to_current``) so that, on the pruned stream, the layer writes what the *original* model has in its
    residual stream just before the next kept layer: the layer before a removed run learns to stand in for the
    run (this contains ReplaceMe's linear map as a special case), and every later layer absorbs the drift.
    Closed form, one (width + 1)^2 Gram matrix per kept layer, about two forward passes. Returns
    {original layer index: (weight (hidden, width), bias (hidden,))}; ``drop_layers(..., refit=True)`` applies it.
    """
    drop = set(arch.check_layer_set(model, indices))
    require_batches(calibration, "refit_after_removal", model)
    n = arch.num_layers(model)
    kept = [i for i in range(n) if i not in drop]
    target_of = {i: (kept[j + 1] - 1 if j + 1 < len(kept) else n - 1) for j, i in enumerate(kept)}
    layers = arch.decoder_layers(model)
    reference, pruned, arguments, masks = streams.two_streams(model, calibration)  # original / without `drop`
    done, outputs = -1, {}
    for index in kept:
        while done < target_of[index]:  # the original stream runs ahead to the output the layer must match
            done += 1
            reference = streams.run_layer(layers[done], reference, arguments)
        _, activations, mids = streams.run_tapped(model, index, pruned, arguments)
        gram, cross = streams.output_moments(activations, mids, reference, masks)
        current = projections.weight_out_in(arch.mlp_parts(model, index).output).double().cpu()
        weight, bias = damped_least_squares(gram, cross, current, shrink_to_current)
        outputs[index] = (weight, bias)
        w, c = weight.to(mids[0].device, mids[0].dtype), bias.to(mids[0].device, mids[0].dtype)
        pruned = [mid + act @ w.T + c for mid, act in zip(mids, activations, strict=True)]
    return outputs
