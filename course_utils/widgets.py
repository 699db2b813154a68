"""The classroom explorer: choose a method and a ratio, see what pruning does, without reloading the model.

Every setting is a reversible what-if on the one model in memory (no copy, weights never change):
- ``width``: the lowest-scored share of every MLP's neurons is silenced (a pre-hook zeroes their activations
  before the output projection), which computes what removing them does, without the refit;
- ``depth``: the layers of lowest block influence pass their input through (``hooks.skip_layers``);
- ``bypass``: the attention sub-layers of lowest importance are skipped (``bypass.skipping``).
``ratio`` is the share of MLP neurons (width) or of decoder layers (depth, bypass); the parameters a real
removal would take away are counted exactly, so settings compare at equal parameters removed. Scores are
computed once per method, on first use; every measured setting is kept, so going back to one is instant.

``Explorer.widget()`` builds the ipywidgets controls (Jupyter and Colab); ``Explorer.show()`` prints and draws
one setting without widgets (what a notebook on GitHub displays, and what runs headless under nbval).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import allocation, anatomy, arch, bypass, evaluation, hooks, importance

METHODS = ("width", "depth", "bypass")
DEFAULT_PROMPT = "The history of the city begins"


@dataclass
class Setting:
    """One measured what-if."""

    method: str
    ratio: float
    removed: str  # what was taken away, in words
    parameters_removed: int
    share_removed: float  # of the model's parameters
    ppl: float  # over every document together
    ppl_range: tuple[float, float]  # lowest and highest of the documents' perplexities
    text: str  # greedy continuation of the prompt

    @property
    def label(self) -> str:
        return "base" if self.method == "base" else f"{self.method} {self.ratio:.0%}"


class Explorer:
    """What-if pruning on ``model`` for a classroom: ``measure(method, ratio)``, ``show``, ``widget``."""

    def __init__(self, model: nn.Module, tokenizer, calibration: list[dict], documents: list[list[str]],
                 eval_tokens: int = 512, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 16,
                 width_score: str = "wanda_like", split: str = "held-out"):
        if not documents or not all(isinstance(d, list) and d for d in documents):
            raise ValueError("documents: a list of documents to measure on, each a list of paragraphs "
                             "(data.load_documents('evaluation'), or a validation slice of it)")
        self.model, self.tokenizer, self.calibration, self.documents = model, tokenizer, calibration, documents
        self.eval_tokens, self.prompt, self.max_new_tokens = eval_tokens, prompt, max_new_tokens
        self.width_score, self.split = width_score, split  # split: what the documents are, for the labels
        self.parameters = anatomy.count_parameters(model)
        self.n_layers = arch.num_layers(model)
        self._scores: dict[str, object] = {}
        self.measured: dict[tuple[str, float], Setting] = {}

    # -- what each setting removes ------------------------------------------------------------------

    def scores(self, method: str):
        """Neuron scores per layer (width) or one score per layer (depth, bypass), computed once."""
        check_method(method)
        if method not in self._scores:
            if method == "width":
                stats = importance.collect_stats(self.model, self.calibration)
                self._scores[method] = {i: importance.score_layer(self.model, i, self.width_score, stats[i])
                                        for i in range(self.n_layers)}
            elif method == "depth":
                self._scores[method] = importance.block_influence(self.model, self.calibration)
            else:
                self._scores[method] = importance.attention_importance(self.model, self.calibration)
        return self._scores[method]

    def plan(self, method: str, ratio: float) -> tuple[object, int, str]:
        """(what to silence, parameters a real removal takes away, description) for one setting."""
        check_method(method)
        ratio = allocation.check_ratio(ratio)
        if method == "width":
            scores = self.scores(method)
            silenced = {i: s.argsort()[: s.numel() - allocation.kept_width(s.numel(), ratio)]
                        for i, s in scores.items()}
            removed = sum(len(idx) * anatomy.neuron_parameters(self.model, i) for i, idx in silenced.items())
            width = next(iter(scores.values())).numel()
            return silenced, removed, f"{len(silenced[0])} of {width} MLP neurons in every layer"
        n = round(ratio * self.n_layers)
        if n > self.n_layers - 1:
            raise ValueError(f"ratio {ratio} would remove all {self.n_layers} layers; keep at least one")
        layers = sorted(self.scores(method).argsort()[:n].tolist())
        if method == "depth":
            removed = sum(anatomy.count_parameters(arch.decoder_layers(self.model)[i]) for i in layers)
            return layers, removed, f"layers {layers}" if layers else "no layer"
        norm = arch.get_spec(self.model).norms[0]  # a real bypass drops the pre-attention norm as well
        removed = sum(anatomy.count_parameters(arch.attention_module(self.model, i))
                      + anatomy.count_parameters(arch.get_module(arch.decoder_layers(self.model)[i], norm))
                      for i in layers)
        return layers, removed, f"attention of layers {layers}" if layers else "no attention sub-layer"

    @contextmanager
    def applied(self, method: str, ratio: float) -> Iterator[nn.Module]:
        """The model with one setting in force; everything is restored on exit (the weights never change)."""
        what, _, _ = self.plan(method, ratio)
        if method == "width":
            handles = []
            for index, neurons in what.items():
                if len(neurons):
                    keep = torch.ones(arch.mlp_parts(self.model, index).width)
                    keep[neurons] = 0

                    def silence(module, args, keep=keep):
                        return (args[0] * keep.to(args[0].device, args[0].dtype), *args[1:])
                    handles.append(arch.mlp_parts(self.model, index).output.register_forward_pre_hook(silence))
            with hooks.removing(handles):
                yield self.model
        elif method == "depth":
            with hooks.skip_layers(self.model, what):
                yield self.model
        else:
            with bypass.skipping(self.model, what):
                yield self.model

    # -- measuring and showing ------------------------------------------------------------------------

    def measure(self, method: str, ratio: float) -> Setting:
        """PPL on ``eval_tokens`` tokens spread over the documents, and a greedy continuation (cached)."""
        check_method(method)
        key = ("base", 0.0) if ratio == 0 else (method, round(float(ratio), 4))
        if key not in self.measured:
            _, removed, words = self.plan(method, ratio) if ratio else (None, 0, "nothing")
            with self.applied(method, ratio) if ratio else _unchanged(self.model) as model:
                spread = evaluation.perplexity_spread(model, self.tokenizer, self.documents,
                                                      max(2, self.eval_tokens // len(self.documents)))
                text = evaluation.generate(model, self.tokenizer, self.prompt, max_new_tokens=self.max_new_tokens)
            self.measured[key] = Setting(key[0], key[1], words, removed, removed / self.parameters, spread.ppl,
                                         (min(spread.per_document), max(spread.per_document)), text)
        return self.measured[key]

    def figure(self, current: Setting | None = None):
        """A bar chart of every setting measured so far (by parameters removed), the current one highlighted."""
        import matplotlib.pyplot as plt

        settings = sorted(self.measured.values(), key=lambda s: (s.share_removed, s.method))
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(settings) + 2), 3.2))
        colours = {"base": "0.5", "width": "tab:blue", "depth": "tab:orange", "bypass": "tab:green"}
        bars = ax.bar(range(len(settings)), [s.ppl for s in settings], color=[colours[s.method] for s in settings],
                      edgecolor=["black" if s is current else "none" for s in settings], linewidth=2)
        ax.set_xticks(range(len(settings)), [f"{s.label}\n-{s.share_removed:.1%}" for s in settings], fontsize=8)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_ylabel(f"{self.split} PPL ({self.eval_tokens} tokens,\n{len(self.documents)} documents)")
        ax.set_title("every setting tried (label: method, ratio, share of parameters removed)", fontsize=9)
        fig.tight_layout()
        return fig

    def report(self, setting: Setting) -> str:
        base = self.measure("width", 0.0)
        return (f"{setting.label}: {setting.removed}\n"
                f"parameters removed: {setting.parameters_removed / 1e6:.2f} M ({setting.share_removed:.1%})\n"
                f"{self.split} PPL: {setting.ppl:.2f} "
                f"(documents {setting.ppl_range[0]:.1f} to {setting.ppl_range[1]:.1f}; "
                f"unpruned {base.ppl:.2f})\n"
                f"{self.prompt!r} -> {setting.text!r}")

    def show(self, method: str, ratio: float) -> Setting:
        """Measure, print and draw one setting (no widgets needed)."""
        setting = self.measure(method, ratio)
        print(self.report(setting))
        _display(self.figure(setting))
        return setting

    def widget(self, method: str = "width", ratio: float = 0.2, max_ratio: float = 0.5):
        """Dropdown + slider + output: each change measures (or recalls) a setting and redraws."""
        import ipywidgets as widgets

        check_method(method)
        choose = widgets.Dropdown(options=list(METHODS), value=method, description="method")
        slide = widgets.FloatSlider(value=ratio, min=0.0, max=max_ratio, step=0.05, description="ratio",
                                    continuous_update=False, readout_format=".0%")
        out = widgets.Output()

        def update(change=None):
            with out:
                out.clear_output(wait=True)
                setting = self.measure(choose.value, slide.value)
                print(self.report(setting))
                _display(self.figure(setting))

        choose.observe(update, names="value")
        slide.observe(update, names="value")
        update()
        return widgets.VBox([widgets.HBox([choose, slide]), out])


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return method


@contextmanager
def _unchanged(model: nn.Module) -> Iterator[nn.Module]:
    yield model


def _display(fig) -> None:
    """Show a figure in a notebook (or an ipywidgets Output) and close it, so it is drawn once."""
    import matplotlib.pyplot as plt

    try:
        from IPython.display import display
    except ImportError:  # plain Python: nothing to draw into
        pass
    else:
        display(fig)
    plt.close(fig)
