"""The PyTorch adapter: plans become ``nn.Sequential`` trees whose state_dict keys are the
canonical names; lazy modules (``LazyLinear``, ``LazyConv2d``, ``LazyBatchNorm*``) where the plan
leaves a size open; ``torch.nn.init`` to initialize.

torch is imported in ``import_framework`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from backends import base
from backends.protocol import ModuleWalk, Plan
from backends.torch_support import TorchDevices

#: initializers that are one ``torch.nn.init.<name>_`` call with the plan's arguments as keywords
NATIVE_INITS = {"constant", "zeros", "ones", "eye", "dirac", "uniform", "normal", "trunc_normal",
                "sparse", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal",
                "orthogonal"}


def _variance_scaling(nn, t, scale, mode, distribution) -> str:
    """Keras/JAX variance scaling with torch.nn.init draws (torch's layout is canonical)."""
    std = math.sqrt(scale / base.fan(tuple(t.shape), mode))
    if distribution == "uniform":
        nn.init.uniform_(t, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
    elif distribution == "normal":
        nn.init.normal_(t, 0.0, std)
    else:
        std /= base.TRUNCATED_NORMAL_STD_CORRECTION
        nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std)
    return f"custom: variance_scaling({mode}, {distribution}) via torch.nn.init"


def _bimodal(nn, t) -> str:
    nn.init.uniform_(t, -10.0, 10.0)
    t.masked_fill_(t.abs() < 5, 0.0)
    return "custom: uniform_(-10, 10), then |w| < 5 set to 0"


#: initializers torch.nn.init has no one call for: name -> fn(nn, tensor, **args) -> how
CUSTOM_INITS = {"variance_scaling": _variance_scaling, "bimodal": _bimodal}


# ------------------------------------------------------------------------------ builders

def _dense(a, node):
    if node.in_units is None:
        return a.nn.LazyLinear(node.units, bias=node.bias)
    return a.nn.Linear(node.in_units, node.units, bias=node.bias)


def _conv2d(a, node):
    args = dict(kernel_size=tuple(node.kernel), stride=tuple(node.stride),
                padding=tuple(node.padding), bias=node.bias)
    if node.in_channels is None:
        return a.nn.LazyConv2d(node.channels, **args)
    return a.nn.Conv2d(node.in_channels, node.channels, **args)


def _batch_norm(a, node):
    nn, args = a.nn, dict(eps=node.eps, momentum=node.momentum)
    if node.num_features is None:
        return (nn.LazyBatchNorm2d if node.in_rank == 4 else nn.LazyBatchNorm1d)(**args)
    return (nn.BatchNorm2d if node.in_rank == 4 else nn.BatchNorm1d)(node.num_features, **args)


def _my_dense(a, node):
    return a.LazyMyDense(node.units) if node.in_units is None else \
        a.MyDense(node.in_units, node.units)


def _recurrent(kind):
    """``nn.LSTM`` / ``nn.GRU(batch_first=True)`` returning its output sequence (or last
    step); a lazy one where the plan leaves input_size open."""
    def make(a, node):
        if node.input_size is None:
            return a.lazy_recurrent[kind](node.units, node.bias, node.return_sequences)
        return a.recurrent[kind](node.input_size, node.units, bias=node.bias, batch_first=True,
                                 return_sequences=node.return_sequences)
    return make
def _attention(a, node):
    """nn.MultiheadAttention(batch_first=True) called on one input (``SelfAttention``); lazy
    (``LazySelfAttention``) where the plan leaves embed_dim open: torch has no lazy one."""
    if node.embed_dim is None:
        return a.LazySelfAttention(node.num_heads, node.causal, node.bias)
    return a.SelfAttention(node.embed_dim, node.num_heads, node.causal, node.bias)


def _layer_norm(a, node):
    if node.num_features is None:
        return a.LazyLayerNorm(eps=node.eps, elementwise_affine=node.affine)
    return a.nn.LayerNorm(node.num_features, eps=node.eps, elementwise_affine=node.affine)


#: layer type -> module (``backends.base.BaseAdapter.builders``)
BUILDERS = {
    "dense": _dense,
    "my_dense": _my_dense,
    "conv2d": _conv2d,
    "batch_norm": _batch_norm,
    "max_pool2d": lambda a, node: a.nn.MaxPool2d(tuple(node.pool), tuple(node.stride),
                                                 tuple(node.padding)),
    "flatten": lambda a, node: a.nn.Flatten(),
    "relu": lambda a, node: a.nn.ReLU(),
    "sigmoid": lambda a, node: a.nn.Sigmoid(),
    "tanh": lambda a, node: a.nn.Tanh(),
    "center": lambda a, node: a.Center(),
    "softmax": lambda a, node: a.nn.Softmax(dim=-1),
    "avg_pool2d": lambda a, node: a.nn.AvgPool2d(tuple(node.pool), tuple(node.stride),
                                                 tuple(node.padding),
                                                 count_include_pad=node.count_include_pad),
    # torchvision's ResNet: avgpool = AdaptiveAvgPool2d((1, 1)), then torch.flatten(x, 1)
    "global_avg_pool": lambda a, node: a.nn.Sequential(a.nn.AdaptiveAvgPool2d(1),
                                                       a.nn.Flatten()),
    "lstm": _recurrent("lstm"),
    "gru": _recurrent("gru"),
    "multi_head_attention": _attention,
    "layer_norm": _layer_norm,
    "gelu": lambda a, node: a.nn.GELU(approximate=node.approximate),
    "dropout": lambda a, node: a.nn.Dropout(node.rate),
    "embedding": lambda a, node: a.nn.Embedding(node.vocab, node.dim),
}


@dataclass
class _Residual:
    """A residual as a step of the block around it (not a module): its modules by their
    names there, and the step ``(body steps, shortcut name or None, activation or None)``."""
    named: list
    step: tuple


@dataclass
class _Model:
    """A built plan: the ``nn.Sequential`` tree and the plan it came from."""
    net: Any
    plan: Plan


class Adapter(TorchDevices, base.BaseAdapter):
    """PyTorch: lazy modules where the plan leaves sizes open, ``torch.nn.init`` to initialize."""

    def import_framework(self) -> dict:
        versions = self.import_torch()
        self.nn = self.torch.nn
        (self.Block, self.Graph, self.Center, self.MyDense,
         self.LazyMyDense, self.LazyLayerNorm) = _layer_classes(self.torch, self.nn)
        self.recurrent, self.lazy_recurrent = _recurrent_classes(self.torch, self.nn)
        self.SelfAttention, self.LazySelfAttention = _attention_classes(self.torch, self.nn)
        return versions

    def seed(self, seed: int) -> None:
        """Seed torch's global generators (CPU and every CUDA device)."""
        self.torch.manual_seed(seed)

    # -- building -----------------------------------------------------------------------------

    builders = BUILDERS

    def make_block(self, node, layers):
        """An ``nn.Sequential`` whose children are named by their plan segments, so that
        ``state_dict`` keys are the canonical names; with a residual in it, a ``Graph`` whose
        children are the residual's layers too, under the same names."""
        named, steps = _steps(node.layers, layers)
        if all(isinstance(step, str) for step in steps):
            return self.Block(named)
        return self.Graph(named, steps)

    def make_residual(self, node, body, shortcut, activation):
        """Not a module: the block around it registers its layers (torchvision's BasicBlock
        registers conv1, bn1, downsample itself) and runs ``activation(body(x) + shortcut(x))``
        in its forward; the activation has no state and is not registered."""
        named, steps = _steps(node.layers, body)
        if shortcut is not None:
            named.append((node.shortcut.name, shortcut[0]))
        return _Residual(named, (steps, None if shortcut is None else node.shortcut.name,
                                 None if activation is None else activation[0]))

    def finish_build(self, plan, tree):
        return _Model(tree.root.to(self.device), plan)

    # -- parameters ---------------------------------------------------------------------------

    def param_refs(self, model):
        """Every owned parameter and buffer, named as ``state_dict`` names it first."""
        keys = {}
        for key, tensor in model.net.state_dict(keep_vars=True).items():
            keys.setdefault(id(tensor), key)
        refs = []
        for name, node, role in base.owned_params(model.plan):
            tensor = _submodule(model.net, f"{node.path}.{role}".rpartition(".")[0])
            tensor = getattr(tensor, role.rpartition(".")[2])  # out_proj.weight: in out_proj
            refs.append(base.ParamRef(name, node, role, keys[id(tensor)], tensor))
        return refs

    def describe(self, model, ref):
        t = ref.handle
        if self.nn.parameter.is_lazy(t):
            return base.ParamInfo(None, None, t.requires_grad, initialized=False,
                                  touch=_touch(t))
        return base.ParamInfo(tuple(t.shape), str(t.dtype).removeprefix("torch."),
                              t.requires_grad)

    def read(self, model, ref):
        return ref.handle.detach().cpu().numpy().copy()

    def write(self, model, arrays):
        with self.torch.no_grad():
            for ref, arr in arrays.values():
                ref.handle.copy_(self.torch.from_numpy(arr))

    def share_key(self, model, position):
        """The module torch's own tree holds at that position (a ref holds its target)."""
        return id(_submodule(model.net, position.path))

    def init_param(self, model, ref, init) -> str:
        nn, kind, args = self.nn, init["name"], base.init_args(init)
        if kind == "default":
            module = _submodule(model.net, ref.node.path)
            if isinstance(module, self.MyDense):
                return "native: torch.randn in the hand-made MyDense (d2l's MyLinear)"
            if isinstance(module, self.SelfAttention):  # out_proj is a Linear inside it
                return ("native: torch default (Linear.reset_parameters, then "
                        "MultiheadAttention._reset_parameters)")
            return f"native: torch default ({type(module).reset_parameters.__qualname__})"
        with self.torch.no_grad():
            if kind in NATIVE_INITS:
                getattr(nn.init, f"{kind}_")(ref.handle, **args)
                return f"native: torch.nn.init.{kind}_"
            if kind in CUSTOM_INITS:
                return CUSTOM_INITS[kind](nn, ref.handle, **args)
        raise ValueError(f"unsupported initializer {kind!r}")

    def init_by_type(self, model, layer_type, roles):
        """The lessons' idiom: ``net.apply(init_fn)``, where ``init_fn`` tests each module's
        class, ``type(m) == nn.Linear`` as d2l writes it, and initializes the parameters of
        those that match. Not ``isinstance``: ``nn.MultiheadAttention.out_proj`` is a
        ``NonDynamicallyQuantizableLinear``, a subclass of ``nn.Linear``, which an
        ``isinstance`` test would re-initialize as a dense layer of the spec."""
        classes = self.owner_classes(model, layer_type,
                                     lambda node: _submodule(model.net, node.path))
        refs = {id(ref.handle): ref for ref in self.param_refs(model)}
        reached = {}

        def init_fn(m):
            if type(m) in classes:
                for role, init in roles.items():
                    if getattr(m, role, None) is None:
                        continue  # a layer without it (bias: false)
                    ref = refs[id(getattr(m, role))]
                    init, note = self.resolve_init(model, ref, init)
                    reached[ref.name] = self.init_param(model, ref, init) + note

        model.net.apply(init_fn)
        names = " or ".join(f"nn.{c.__name__}" if c.__module__.startswith("torch.") else
                            c.__name__ for c in classes)
        return f"net.apply(init_fn), init_fn testing type(m) == {names}", reached

    def module_walk(self, model):
        """``named_children()`` (the first level) and ``named_modules()`` (every module, the
        net itself first as '', a shared module once)."""
        numbers = {}
        return ModuleWalk(
            "nn.Module.named_children()", self.walk_entries(model.net.named_children(), numbers),
            "nn.Module.named_modules()", self.walk_entries(model.net.named_modules(), numbers))

    # -- compute ------------------------------------------------------------------------------

    def from_numpy(self, arr):
        return self.torch.from_numpy(arr).to(self.device)

    def to_numpy(self, value):
        return value.detach().to("cpu", copy=True).numpy()

    def _train_mode(self, model, training):
        """train() or eval(), with every Dropout in eval() (the identity): the checks' mode;
        only the timed training step (``step``) drops."""
        model.net.train(training)
        for module in model.net.modules():
            if isinstance(module, self.nn.Dropout):
                module.eval()

    def run(self, model, x, *, training=False):
        """Forward in train() or eval() mode, without autograd (``grads`` has its own);
        dropout is the identity."""
        self._train_mode(model, training)
        with self.torch.no_grad():
            return model.net(x)

    # -- training semantics -------------------------------------------------------------------

    def _trainable(self, model):
        return [ref for ref in self.param_refs(model) if ref.handle.requires_grad]

    def grads(self, model, x, cotangent, training=True):
        """``torch.autograd.grad`` of sum(output * C) in train() (or eval()) mode (no ``.grad``
        touched), dropout the identity."""
        refs = self._trainable(model)
        self._train_mode(model, training)
        y = model.net(x)
        grads = self.torch.autograd.grad((y * cotangent).sum(), [r.handle for r in refs])
        return y.detach(), {r.name: g for r, g in zip(refs, grads)}

    def save(self, model, stem):
        path = stem + ".pt"
        state = model.net.state_dict()
        self.torch.save(state, path)
        return base.SavedFile(path, "torch.save(state_dict()): zip of tensors", list(state))

    def restore(self, model, path):
        """``torch.load(weights_only=True)`` then ``load_state_dict(strict=True)``; lazy modules
        take their shapes from the file (no forward needed)."""
        try:
            state = self.torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path} is not a PyTorch state_dict file (torch.load with "
                             f"weights_only=True: {type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict")
        model.net.load_state_dict(state, strict=True)
        return None

    def semantics(self):
        nn, torch = self.nn, self.torch

        class Plain(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.zeros(2)  # a plain tensor attribute

        plain = len(list(Plain().parameters()))
        ones = torch.ones(1, 1, 4, 4)
        # query 0's mask row [True, False], query 1's [False, True]; token 1 then changed
        mask = torch.tensor([[True, False], [False, True]])
        x = torch.tensor([[[1.0, 0.5], [-0.5, 1.0]]])
        y = torch.tensor([[[1.0, 0.5], [2.0, -1.0]]])
        mha = nn.MultiheadAttention(2, 1, batch_first=True)
        with torch.no_grad():
            blocks = [mha(t, t, t, need_weights=False, attn_mask=mask)[0][0, 0] for t in (x, y)]
            sdpa = [nn.functional.scaled_dot_product_attention(t, t, t, attn_mask=mask)[0, 0]
                    for t in (x, y)]
        return {**base.pool_semantics(nn.AvgPool2d(2)(ones).shape[-1], "AvgPool2d(2)",
                                      float(nn.AvgPool2d(3, 1, 1)(ones)[0, 0, 0, 0]),
                                      "AvgPool2d(3, 1, padding=1)"),
            "batch_norm_momentum": "new = (1 - momentum) * old + momentum * batch "
                                   "(torch.nn.BatchNorm*, momentum=0.1)",
            "batch_norm_running_var": "unbiased batch variance (n / (n - 1)); the output is "
                                      "normalized with the biased one",
            "attention_mask": base.attention_mask_semantics(
                "nn.MultiheadAttention(attn_mask=bool)", bool(torch.equal(*blocks)))
            + "; " + base.attention_mask_semantics(
                "F.scaled_dot_product_attention(attn_mask=bool)", bool(torch.equal(*sdpa))),
            "gradient_accumulation": "autograd sums every use of a parameter into one gradient",
            "custom_parameters": "nn.Parameter attributes of an nn.Module are registered; a "
                                 f"plain tensor attribute is silently not ({plain} parameters "
                                 "for a module holding one)",
        }

    # -- timing -------------------------------------------------------------------------------

    def modes(self):
        return {"eager": "nn.Module.__call__ (eager)",
                "compiled": f"torch.compile(module) (inductor), torch {self.torch.__version__}"}

    def step(self, model, phase, mode, x, cotangent, lr):
        """``compiled``: the same step around ``torch.compile(module)``, made for this step."""
        torch = self.torch
        compiled = mode != "eager"
        net = self.torch_compile(model.net) if compiled else model.net
        model.net.train(phase == "train")
        if phase == "inference":
            def infer():
                with torch.no_grad():
                    return net(x)
            return self.compiled_step(infer) if compiled else infer
        params = [r.handle for r in self._trainable(model)]

        def train():
            loss = (net(x) * cotangent).sum()
            loss.backward()
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
            for p in params:
                p.grad = None
            return loss
        return self.compiled_step(train) if compiled else train

    def matmul(self, n):
        a, b = (self.torch.randn(n, n, device=self.device) for _ in range(2))
        return lambda: a @ b



def _submodule(net, path: str):
    """The module at a canonical path, through ``_modules`` (``get_submodule`` uses getattr,
    which a child named like a method, ``forward``, would not reach)."""
    for segment in path.split("."):
        net = net._modules[segment]
    return net


def _steps(nodes, items) -> tuple[list, list]:
    """(named modules, forward steps) of plan nodes and their modules (one each in torch): a
    module is a step by its name, a residual brings its own named modules and step."""
    named, steps = [], []
    for node, item in zip(nodes, items, strict=True):
        if isinstance(item, _Residual):
            named += item.named
            steps.append(item.step)
        else:
            named.append((node.name, item))
            steps.append(node.name)
    return named, steps


def _layer_classes(torch, nn):
    """The custom modules (defined late: they subclass torch classes)."""

    class Block(nn.Sequential):
        """``nn.Sequential`` whose children may have any name the spec allows: registered in
        ``_modules`` directly, where ``add_module`` refuses names that nn.Module uses as
        attributes (``forward``, ``state_dict``, ...; ``training`` the spec refuses)."""

        def __init__(self, named):
            nn.Module.__init__(self)
            for name, module in named:
                self._modules[name] = module

    class Graph(nn.Module):
        """A block with residuals in it: its children (the residuals' layers among them) by
        their plan names, registered as ``Block``'s are, and a forward that runs its steps: a
        child's name, or a residual ``(body steps, shortcut name or None, activation)``."""

        def __init__(self, named, steps):
            nn.Module.__init__(self)
            for name, module in named:
                self._modules[name] = module
            self.steps = steps

        def forward(self, x):
            return self.run(self.steps, x)

        def run(self, steps, x):
            for step in steps:
                if isinstance(step, str):
                    x = self._modules[step](x)
                    continue
                body, shortcut, activation = step
                y = self.run(body, x) + (x if shortcut is None else self._modules[shortcut](x))
                x = y if activation is None else activation(y)
            return x

    class Center(nn.Module):
        """The d2l CenteredLayer: ``x - x.mean()``, mean over every element."""

        def forward(self, x):
            return x - x.mean()

    class MyDense(nn.Module):
        """d2l's MyLinear: two hand-made ``nn.Parameter``s (registered by attribute
        assignment), relu(x W^T + b); torch.randn is its own initialization."""

        def __init__(self, in_units, units, draw=torch.randn):
            super().__init__()
            self.weight = nn.Parameter(draw(units, in_units))
            self.bias = nn.Parameter(draw(units))

        def forward(self, x):
            return torch.relu(x @ self.weight.T + self.bias)

    class LazyMyDense(nn.modules.lazy.LazyModuleMixin, MyDense):
        """The same, lazily: ``UninitializedParameter``s until the first input gives in_units
        (torch's LazyModuleMixin protocol, as LazyLinear)."""
        cls_to_become = MyDense

        def __init__(self, units):
            super().__init__(0, units, draw=torch.empty)  # LazyModuleMixin's hooks, no draws
            self.units = units
            self.weight = nn.parameter.UninitializedParameter()
            self.bias = nn.parameter.UninitializedParameter()

        def initialize_parameters(self, x):
            if self.has_uninitialized_params():
                with torch.no_grad():
                    self.weight.materialize((self.units, x.shape[-1]))
                    self.bias.materialize((self.units,))
                    self.weight.normal_()
                    self.bias.normal_()

    class LazyLayerNorm(nn.modules.lazy.LazyModuleMixin, nn.LayerNorm):
        """torch has no lazy LayerNorm: LazyBatchNorm's pattern, ``UninitializedParameter``s
        (affine) until the first input gives the last axis's size, then ``nn.LayerNorm``."""
        cls_to_become = nn.LayerNorm

        def __init__(self, eps, elementwise_affine):
            super().__init__(0, eps=eps, elementwise_affine=elementwise_affine)
            if elementwise_affine:
                self.weight = nn.parameter.UninitializedParameter()
                self.bias = nn.parameter.UninitializedParameter()

        def reset_parameters(self):
            if self.normalized_shape != (0,) and not self.has_uninitialized_params():
                super().reset_parameters()

        def initialize_parameters(self, x):
            self.normalized_shape = (x.shape[-1],)
            if self.has_uninitialized_params():
                with torch.no_grad():
                    self.weight.materialize(self.normalized_shape)
                    self.bias.materialize(self.normalized_shape)
                    self.reset_parameters()

    return Block, Graph, Center, MyDense, LazyMyDense, LazyLayerNorm


def _recurrent_classes(torch, nn):
    """``{kind: class}`` of nn.LSTM / nn.GRU returning one tensor, and their lazy versions."""
    eager, lazy = {}, {}
    for kind, parent in (("lstm", nn.LSTM), ("gru", nn.GRU)):

        class Recurrent(parent):
            """torch's own module; ``forward`` keeps the output sequence (drops the final
            states), or its last step."""

            def __init__(self, *args, return_sequences=True, **kwargs):
                super().__init__(*args, **kwargs)
                self.return_sequences = return_sequences

            def forward(self, x):
                y = super().forward(x)[0]
                return y if self.return_sequences else y[:, -1]

        class LazyRecurrent(nn.modules.lazy.LazyModuleMixin, Recurrent):
            """input_size from the first input: weight_ih_l0 an ``UninitializedParameter``
            until then (LazyModuleMixin, as LazyLinear), then drawn as reset_parameters draws
            every weight, U(+-1/sqrt(H))."""
            cls_to_become = Recurrent

            def __init__(self, units, bias, return_sequences):
                super().__init__(1, units, bias=bias, batch_first=True,
                                 return_sequences=return_sequences)
                self.weight_ih_l0 = nn.parameter.UninitializedParameter()
                self._init_flat_weights()

            def initialize_parameters(self, x):
                if self.has_uninitialized_params():
                    with torch.no_grad():
                        self.weight_ih_l0.materialize((self.weight_hh_l0.shape[0], x.shape[-1]))
                        bound = 1.0 / math.sqrt(self.hidden_size)
                        self.weight_ih_l0.uniform_(-bound, bound)
                # the size load_state_dict materialized, or the one just drawn
                self.input_size = self.weight_ih_l0.shape[1]
                self._init_flat_weights()

        Recurrent.__name__ = Recurrent.__qualname__ = parent.__name__
        LazyRecurrent.__name__ = LazyRecurrent.__qualname__ = f"Lazy{parent.__name__}"
        eager[kind], lazy[kind] = Recurrent, LazyRecurrent
    return eager, lazy
def _attention_classes(torch, nn):
    """Self-attention modules (defined late: they subclass torch classes)."""

    class SelfAttention(nn.MultiheadAttention):
        """``nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True)`` called
        as self-attention, ``(x, x, x, need_weights=False)``, its parameters torch's own
        (``in_proj_weight`` (3E, E), ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``).
        Causal: torch's boolean ``attn_mask``, where True means *not* attended (the opposite of
        scaled_dot_product_attention's and Keras's convention)."""

        def __init__(self, embed_dim, num_heads, causal, bias):
            super().__init__(embed_dim, num_heads, bias=bias, batch_first=True)
            self.causal = causal

        def forward(self, x):
            mask = None
            if self.causal:
                n = x.shape[1]
                mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
            return super().forward(x, x, x, need_weights=False, attn_mask=mask)[0]

    class LazySelfAttention(nn.modules.lazy.LazyModuleMixin, SelfAttention):
        """The same with embed_dim from the first input (torch has no lazy attention): its four
        parameters ``UninitializedParameter``s until then, then drawn as
        nn.MultiheadAttention.__init__ draws them (out_proj's Linear, then
        ``_reset_parameters``); a state_dict gives them their shapes too."""
        cls_to_become = SelfAttention

        def __init__(self, num_heads, causal, bias):
            super().__init__(num_heads, num_heads, causal, bias)  # a placeholder size
            uninit = nn.parameter.UninitializedParameter
            self.in_proj_weight, self.out_proj.weight = uninit(), uninit()
            if bias:
                self.in_proj_bias, self.out_proj.bias = uninit(), uninit()

        def _materialize(self, e):
            """Sizes for embedding e, and every parameter materialized (not drawn)."""
            self.embed_dim = self.kdim = self.vdim = e
            self.head_dim = e // self.num_heads
            self.out_proj.in_features = self.out_proj.out_features = e
            self.in_proj_weight.materialize((3 * e, e))
            self.out_proj.weight.materialize((e, e))
            if self.in_proj_bias is not None:
                self.in_proj_bias.materialize((3 * e,))
                self.out_proj.bias.materialize((e,))

        def initialize_parameters(self, x):
            if self.has_uninitialized_params():
                with torch.no_grad():
                    self._materialize(x.shape[-1])
                    self.out_proj.reset_parameters()
                    self._reset_parameters()

        def _lazy_load_hook(self, state_dict, prefix, *args):
            """out_proj's parameters too (LazyModuleMixin's hook sees the module's own)."""
            key = prefix + "out_proj.weight"
            if self.has_uninitialized_params() and key in state_dict:
                with torch.no_grad():
                    self._materialize(state_dict[key].shape[0])

    return SelfAttention, LazySelfAttention


def _touch(tensor) -> str | None:
    """What torch does when an uninitialized tensor's shape is read (the exception, as text)."""
    try:
        _ = tensor.shape
    except Exception as exc:  # torch 2.13: RuntimeError "Can't access the shape of ..."
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None
