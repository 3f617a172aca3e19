"""MemoryModularClassifier: the memory-modular learner (MML) of Kang et al."""

import copy
import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.extmath import softmax
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted
from torch.profiler import record_function
from tqdm.auto import tqdm

from .._machine import bf16_matmul_gain
from .._state import State, publish, writer_lock
from .._validation import check_n_neighbors, l2_normalize, resolve_device
from ..backends import MemoryLike
from ..base import BaseMemoryClassifier, source_metadata
from ..memory import MODALITIES, Memory, MemoryBank
from ._heads import IntegrationHead
from ._prototypes import PROTOTYPE_MODES, class_prototypes

BRANCHES = MODALITIES


def _as_tensor(array, device):
    """`array` as a tensor on `device`, sharing memory where possible.

    Memory arrays are read-only; the heads only read them, so torch's warning
    about non-writable arrays does not apply.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).to(device)


class _View:
    """What one memory's backend gives the heads: neighbors per branch, and prototypes.

    Prototypes are computed once per view, a few classes at a time
    (:meth:`~skmml.backends.MemoryBackend.class_memories`), so a memory that
    lives outside RAM is never loaded whole.
    """

    def __init__(self, backend, estimator, support=None):
        self.backend = backend
        self.classes = backend.classes(MODALITIES)
        self.verbose = bool(estimator.verbose)
        image, text = [], []
        for classes, part in backend.class_memories(self.classes):
            protos = class_prototypes(part, classes, mode=estimator.prototypes,
                                      max_items=estimator.n_prototype_items,
                                      random_state=estimator.random_state, support=support)
            image.append(protos[0])
            text.append(protos[1])
        self.prototypes = {"image": np.concatenate(image), "text": np.concatenate(text)}
        self._tensors = {}

    def prototype_tensor(self, branch, device):
        """The branch's prototypes as a tensor on `device` (cached)."""
        key = (branch, str(device))
        if key not in self._tensors:
            self._tensors[key] = _as_tensor(self.prototypes[branch], device)
        return self._tensors[key]

    def __getstate__(self):
        return {**self.__dict__, "_tensors": {}}

    def _searched_items(self, branch):
        backend = self.backend
        return (sum(map(backend.n_items, MODALITIES)) if backend.unified
                else backend.n_items(branch))

    def neighbors(self, branch, X, k, query_ids=None):
        """(neighbors, slots, bank): the `k` nearest items of each query.

        Fewer than `k` when the memory is smaller. With `query_ids`, a query
        never retrieves the item with its own id (the supervised setting,
        where the training queries are the memory). `slots` are slots of
        `bank`: the backend's table, or a bank of the vectors the search
        returned (a backend without a table).
        """
        extra = int(query_ids is not None)
        k = min(k, self._searched_items(branch) - extra)
        if k < 1:
            raise ValueError(f"The {branch} memory is too small to retrieve neighbors.")
        table = self.backend.table(branch)
        found = self.backend.search(X, k, branch, exclude_ids=query_ids,
                                    vectors=table is None, verbose=self.verbose)
        if table is not None:
            return found, found.keys, table
        n, width = found.ids.shape
        slots = np.where(found.ids >= 0, np.arange(n * width).reshape(n, width), -1)
        bank = MemoryBank(found.vectors.reshape(n * width, -1), found.labels.ravel(),
                          found.ids.ravel(), pd.DataFrame(index=pd.RangeIndex(n * width)))
        return found, slots, bank


class _Episode:
    """A memory view restricted to a few classes (episodic training).

    Its retrieval is an exact search over those classes' items, so the head
    trains with neighborhoods and prototypes of memory it has not seen whole.
    """

    def __init__(self, view, class_codes):
        self.view = view
        self.class_codes = np.sort(class_codes)
        self.classes = view.classes[self.class_codes]

    def prototype_tensor(self, branch, device):
        prototypes = self.view.prototype_tensor(branch, device)
        return prototypes[_as_tensor(self.class_codes, device)]

    def neighbors(self, branch, X, k, query_ids=None):
        backend = self.view.backend
        found = backend.search_within(X, k, branch, self.classes, exclude_ids=query_ids)
        return found, found.keys, backend.table(branch)


class MemoryModularClassifier(BaseMemoryClassifier):
    """The memory-modular learner: kNN retrieval, cross-attention, prototypes.

    A query image embedding retrieves its ``k`` nearest items from the image
    memory and from the text memory; per branch, a small cross-attention head
    integrates the query with its neighbors, and the result is compared with
    class prototypes built from the memory::

        z_c = s * (cos(out_img, p_img_c) + cos(out_txt, p_txt_c))

    Only the heads train; the encoder that made the embeddings stays frozen.
    Because the prototypes and the neighbors come from the memory, replacing
    the memory (:meth:`set_memory`) classifies classes never seen in training,
    with no retraining.

    Parameters
    ----------
    n_neighbors : int, default=32
        Items retrieved from each memory (fewer when a memory is smaller).
    branches : {"auto", "both", "image", "text"}, default="auto"
        Branches that vote; "auto" uses every modality the memory holds.
    retrieval : {"knn", "none"}, default="knn"
        "none" is the paper's "no kNN" ablation: the query itself is the key
        and value of the attention.
    unified_memory : bool, default=False
        Search image and text items as one memory in both branches (ablation).
    prototypes : {"consensus", "mean", "random"}, default="consensus"
        Class prototypes: top-M items by cross-modal consensus (reference;
        a class with one modality gets the mean of all its items), mean of
        all items, or mean of M random items.
    n_prototype_items : int, default=16
        ``M`` of the prototypes, per class and modality.
    logit_scale : float, default=16.0
        ``s`` in the logits.
    residual_init : {"zero", "default"}, default="zero"
        "zero" (a departure from the reference, see Notes) gates each
        residual branch of each head with a per-channel scale initialised at
        zero, so the untrained head is the identity and training departs
        smoothly from the prototype classifier; "default" is the reference
        block with PyTorch's initialisation.
    learning_rate : float, default=1e-3
        AdamW learning rate (the reference uses 1e-6 over up to 1000 GPU epochs).
    weight_decay : float, default=5e-4
        AdamW weight decay.
    batch_size : int, default=256
        Queries per training step.
    max_epochs : int, default=20
        Most training epochs.
    n_iter_no_change : int or None, default=5
        Stop training when the validation accuracy has not improved on its
        best (epoch 0 included) for this many consecutive epochs, as
        scikit-learn's ``SGDClassifier`` and ``MLPClassifier`` do. None trains
        for ``max_epochs``. Only with validation (``validation_fraction``).
    episode_classes : int, float or None, default=None
        Episodic training: each step draws this many training classes (a
        float is a fraction of them), up to ``batch_size`` of their queries,
        and restricts retrieval (exact search) and prototypes to those
        classes, so the heads learn to work with memory they have not seen
        whole. None trains on shuffled batches over all classes.
    validation_fraction : float or None, default=0.2
        Fraction of the training classes held out to select the epoch: after
        each epoch the heads classify these classes' queries with only these
        classes' memory (memory replacement), and the best epoch is kept. The
        untrained heads (epoch 0; with ``residual_init="zero"`` the prototype
        classifier) compete too, and a trained epoch replaces them only if it
        beats them by two standard errors of the validation accuracy. At least
        ``min_validation_classes`` classes are held out, and at least two
        stay for training (so it needs four classes or more); with fewer
        classes this fraction of the training queries is held out instead,
        with the whole memory. With few validation queries and a high
        untrained accuracy no trained epoch can clear that margin, so the
        untrained heads stay. With None the heads train on all queries for
        ``max_epochs`` and the last epoch is kept.
    min_validation_classes : int, default=2
        Fewest held-out classes for validation-class model selection.
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, shuffling and the class split.
    heads_device : {"auto", "cpu", "cuda"}, default="auto"
        Where the heads run; "auto" picks CUDA when torch sees a GPU.
    heads_precision : {"auto", "float32", "bfloat16"}, default="auto"
        Arithmetic of the heads' layers at prediction (training is always
        float32). Prediction folds each head's query and output projections
        into its cached float32 projections of the memory, so per query a
        head's matrix products are its MLP's: "bfloat16" runs those in
        bfloat16 (float32 accumulation; the attention, LayerNorms, softmax
        and the cosines with the prototypes stay float32). Heads that are
        not folded (``retrieval="none"``, a memory whose search returns the
        vectors it found) run all their products in bfloat16.
        "auto" chooses bfloat16 for heads on a CPU that multiplies bfloat16
        at least 1.5x faster than float32 (measured once per machine,
        :mod:`skmml._machine`), else float32. Predictions may differ where
        two classes' logits are within bfloat16's rounding (about 0.4% of a
        logit); ``bench_mml.py`` and ``bench_mml_predict.py`` count them.
    index : str, default="flat"
        Search index of each memory; see :class:`~skmml.NeighborIndex`.
    index_params : dict, default=None
        FAISS search parameters.
    index_device : {"auto", "cpu", "cuda"}, default="auto"
        Where the FAISS indexes live.
    verbose : int, default=0
        Show a progress bar with the loss during training, and say which
        epoch was kept and why.
    memory : Memory, default=None
        The memory. None uses the training data as the image memory (the
        paper's supervised setting); a training query never retrieves itself.
        Training needs an in-RAM memory; predict over a
        :class:`~skmml.MilvusMemory` with :meth:`set_memory`.

    Attributes
    ----------
    memory_ : Memory or MilvusMemory
        The memory in use.
    classes_ : ndarray of shape (n_classes,)
        Classes of the memory, sorted.
    branches_ : tuple of str
        Branches in use.
    heads_ : dict of str to IntegrationHead
        The trained heads, per branch.
    n_features_in_ : int
        Embedding dimension.
    history_ : pandas.DataFrame
        Per epoch: training loss and validation-class accuracy.
    best_epoch_ : int
        Epoch whose weights were kept (0 = untrained).
    n_iter_ : int
        Training epochs run (fewer than ``max_epochs`` when stopped early).

    Notes
    -----
    Departures from the reference code, each for CPU training or for
    generalisation to unseen classes: zero-initialised residual gates
    (:class:`~skmml.mml.IntegrationHead` explains why gates and not
    zero-initialised output layers),
    AdamW with lr 1e-3 for 20 epochs instead of Adam with lr 1e-6, and epoch
    selection on held-out classes with their own memory rather than on
    held-out images of the training classes.

    Inputs are as for :class:`~skmml.KNNVoteClassifier`: sparse ``X`` is
    densified, an all-zero row is kept with similarity 0 to everything (and a
    :class:`~skmml.ZeroEmbeddingWarning`), and the files of encoder output
    become the ``source`` metadata of the memory that :meth:`fit` builds.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skmml import Memory, MemoryModularClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> seen, unseen = y < 5, y >= 5
    >>> clf = MemoryModularClassifier(max_epochs=2, random_state=0).fit(X[seen], y[seen])
    >>> clf.classes_
    array([0, 1, 2, 3, 4])
    >>> clf.set_memory(Memory(X[unseen][:400], y[unseen][:400])).classes_
    array([5, 6, 7, 8, 9])
    >>> bool(clf.score(X[unseen][400:], y[unseen][400:]) > 0.8)
    True
    """

    _fitted_attribute = "heads_"

    _parameter_constraints = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "branches": [StrOptions({"auto", "both", "image", "text"})],
        "retrieval": [StrOptions({"knn", "none"})],
        "unified_memory": ["boolean"],
        "prototypes": [StrOptions(set(PROTOTYPE_MODES))],
        "n_prototype_items": [Interval(Integral, 1, None, closed="left")],
        "logit_scale": [Interval(Real, 0, None, closed="neither")],
        "residual_init": [StrOptions({"zero", "default"})],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), None],
        "episode_classes": [Interval(Integral, 2, None, closed="left"),
                            Interval(Real, 0, 1, closed="right"), None],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither"), None],
        "min_validation_classes": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "heads_device": [StrOptions({"auto", "cpu", "cuda"})],
        "heads_precision": [StrOptions({"auto", "float32", "bfloat16"})],
        "index": [str],
        "index_params": [dict, None],
        "index_device": [StrOptions({"auto", "cpu", "cuda"})],
        "verbose": ["verbose"],
        "memory": [MemoryLike, None],
    }

    def __init__(
        self,
        n_neighbors=32,
        *,
        branches="auto",
        retrieval="knn",
        unified_memory=False,
        prototypes="consensus",
        n_prototype_items=16,
        logit_scale=16.0,
        residual_init="zero",
        learning_rate=1e-3,
        weight_decay=5e-4,
        batch_size=256,
        max_epochs=20,
        n_iter_no_change=5,
        episode_classes=None,
        validation_fraction=0.2,
        min_validation_classes=2,
        random_state=None,
        heads_device="auto",
        heads_precision="auto",
        index="flat",
        index_params=None,
        index_device="auto",
        verbose=0,
        memory=None,
    ):
        self.n_neighbors = n_neighbors
        self.branches = branches
        self.retrieval = retrieval
        self.unified_memory = unified_memory
        self.prototypes = prototypes
        self.n_prototype_items = n_prototype_items
        self.logit_scale = logit_scale
        self.residual_init = residual_init
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.n_iter_no_change = n_iter_no_change
        self.episode_classes = episode_classes
        self.validation_fraction = validation_fraction
        self.min_validation_classes = min_validation_classes
        self.random_state = random_state
        self.heads_device = heads_device
        self.heads_precision = heads_precision
        self.index = index
        self.index_params = index_params
        self.index_device = index_device
        self.verbose = verbose
        self.memory = memory

    # -- training ----------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Train the heads on labelled query embeddings whose classes are in memory.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Query (image) embeddings.
        y : array-like of shape (n_samples,)
            Their classes; each must be in the memory.

        Returns
        -------
        self : MemoryModularClassifier
        """
        with writer_lock(self):
            return self._fit(X, y, self.max_epochs)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None):
        """One more training epoch of the heads on labelled queries (e.g. a few shots).

        The memory is unchanged and the classes of ``y`` must be in it. On
        an unfitted classifier this is :meth:`fit` with one epoch.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Query embeddings.
        y : array-like of shape (n_samples,)
            Their classes.
        classes : array-like, default=None
            Accepted for scikit-learn compatibility: when given, every label
            in ``y`` must be in it. The classes are always the memory's.

        Returns
        -------
        self : MemoryModularClassifier
        """
        self._check_classes(y, classes)
        with writer_lock(self):
            if not hasattr(self, "_state"):
                return self._fit(X, y, 1)
            X, y, _ = self._more_input(X, y)
            check_classification_targets(y)
            state = self._state
            _check_trainable(state.backend)
            _check_known(y, state.view.classes)
            queries = _QuerySet(l2_normalize(X), np.searchsorted(state.view.classes, y),
                                state.view, state.branches, self)
            # Train a copy: the published heads serve reads until the epoch is
            # complete, and an interrupted epoch leaves them as they were.
            heads = copy.deepcopy(state.heads)
            self._epoch(heads, self._optimizer(heads), queries,
                        check_random_state(self.random_state))
            self._adopt(state.backend, view=state.view, support=state.support, heads=heads,
                        untrained=False)
        return self

    def _fit(self, X, y, max_epochs):
        X, y, metadata, sources = self._fit_input(X, y)
        check_classification_targets(y)
        Xn = l2_normalize(X)
        supervised = self.memory is None
        memory = (Memory(Xn, y, image_metadata=source_metadata(sources)) if supervised
                  else self.memory)
        branches = self._resolve_branches(memory)
        if memory.n_features != X.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features but the memory holds "
                f"{memory.n_features}-dimensional embeddings."
            )
        self._check_fits(memory, branches=branches, exclude_self=supervised,
                         where="y (the memory, as memory=None)" if supervised else None)
        backend = self._backend(memory, modalities=branches)
        _check_trainable(backend)
        _check_known(y, backend.classes(MODALITIES))
        device = torch.device(resolve_device(self.heads_device))
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        heads = _new_heads(branches, memory.n_features, self.residual_init, seed, device)
        # In the supervised setting query i is memory item i: it never retrieves itself.
        query_ids = np.arange(len(y)) if supervised else None
        train, val = self._split(Xn, y, backend, branches, query_ids, rng)
        optimizer = self._optimizer(heads)
        history, best, floor, top, stale = [], None, -np.inf, -np.inf, 0
        bar = tqdm(range(max_epochs + 1), desc="training", disable=not self.verbose)
        for epoch in bar:
            loss = np.nan if epoch == 0 else self._epoch(heads, optimizer, train, rng)
            score = np.nan if val is None else self._accuracy(heads, val)
            history.append({"epoch": epoch, "loss": loss, "validation_accuracy": score})
            bar.set_postfix(loss=loss, validation_accuracy=score)
            if epoch == 0 and val is not None:
                # A trained epoch must beat the untrained heads (the prototype
                # classifier) by two standard errors of the validation accuracy.
                floor = score + 2 * np.sqrt(score * (1 - score) / len(val))
            if best is None or val is None or score > max(best[1], floor):
                best = (epoch, score, {b: copy.deepcopy(h.state_dict()) for b, h in heads.items()})
            if val is not None:
                stale = 0 if score > top else stale + 1
                top = max(top, score)
                if self.n_iter_no_change is not None and stale >= self.n_iter_no_change:
                    break
        bar.close()
        for branch, state in best[2].items():
            heads[branch].load_state_dict(state)
        view = train.view if val is None or val.view is train.view else _View(backend, self)
        self._adopt(backend, view=view, heads=heads, untrained=best[0] == 0, fitted={
            "history_": pd.DataFrame(history), "best_epoch_": best[0], "n_iter_": epoch,
            "branches_": branches, "_head_seed": seed, "_head_init": self.residual_init,
            **metadata})
        if self.verbose:
            print(self._selection_report(max_epochs, floor, held_out_classes=(
                val is not None and val.view is not train.view)))
        return self

    def _selection_report(self, max_epochs, floor, held_out_classes):
        """One sentence: which epoch was kept, and why."""
        history = self.history_
        ran = self.n_iter_
        stopped = (f" Stopped after epoch {ran} of {max_epochs}: the validation accuracy did "
                   f"not improve for {self.n_iter_no_change} epochs."
                   if ran < max_epochs else "")
        if max_epochs == 0:
            return "max_epochs=0: keeping the untrained heads."
        if history["validation_accuracy"].isna().all():
            return f"No validation: keeping the last epoch ({ran})."
        on = "held-out classes" if held_out_classes else "held-out queries"
        untrained = history["validation_accuracy"].iloc[0]
        if self.best_epoch_ == 0:
            trained = history.iloc[1:]
            best = trained.loc[trained["validation_accuracy"].idxmax()]
            what = ("the prototype classifier" if self._identity_heads()
                    else "the untrained heads")
            return (
                f"Trained heads did not beat the untrained heads on {on} (best trained "
                f"validation accuracy {best['validation_accuracy']:.3f} at epoch "
                f"{int(best['epoch'])}; needed above {floor:.3f}, the untrained "
                f"{untrained:.3f} plus two standard errors): keeping {what}.{stopped}"
            )
        kept = history["validation_accuracy"].iloc[self.best_epoch_]
        return (
            f"Keeping epoch {self.best_epoch_}: validation accuracy {kept:.3f} on {on} "
            f"beats the untrained heads' {untrained:.3f} by two standard errors "
            f"(needed above {floor:.3f}).{stopped}"
        )

    def _identity_heads(self):
        return all(self._state.identity.values())

    def _modalities(self, memory):
        state = getattr(self, "_state", None)
        return self._resolve_branches(memory) if state is None else state.branches

    def _unified(self):
        return self.unified_memory

    def _check_replacement(self, memory):
        if memory.n_features != self.n_features_in_:
            raise ValueError(
                f"Dimension mismatch: the new memory holds {memory.n_features}-dimensional "
                f"embeddings, the heads take {self.n_features_in_}."
            )

    def _check_fits(self, memory, n_items=None, branches=None, exclude_self=False,
                    where=None):
        """The memory must hold two classes and ``n_neighbors`` items per searched branch."""
        if n_items is None:
            classes = memory.classes
            if len(classes) < 2:
                where = where or "the memory"
                raise ValueError(
                    f"MemoryModularClassifier needs at least 2 classes to classify, but "
                    f"{where} holds " + (f"one class: {classes[0].item()!r}." if len(classes)
                                         else "no class."))
            n_items = {m: memory.n_items(m) for m in MODALITIES}
        if self.retrieval != "knn":
            return
        for branch in branches or self._modalities(memory):
            n = sum(n_items.values()) if self.unified_memory else n_items[branch]
            bank = "image and text" if self.unified_memory else branch
            check_n_neighbors(self.n_neighbors, n, bank, exclude_self)

    def _resolve_branches(self, memory):
        present = tuple(b for b in BRANCHES if memory.n_items(b))
        wanted = {"auto": present, "both": BRANCHES}.get(self.branches, (self.branches,))
        missing = [b for b in wanted if b not in present and not self.unified_memory]
        if missing or not wanted:
            raise ValueError(
                f"branches={self.branches!r} needs {' and '.join(missing or BRANCHES)} "
                "items, but the memory has none."
            )
        return wanted

    def _split(self, Xn, y, backend, branches, query_ids, rng):
        """Training and validation query sets.

        Validation holds out whole classes with their own memory; with too
        few classes for that, it holds out queries and keeps the memory.
        """
        classes = np.unique(y)
        if self.validation_fraction is None:
            return _QuerySet(Xn, None, _View(backend, self), branches, self,
                             labels=y, query_ids=query_ids), None
        n_val = max(self.min_validation_classes,
                    int(round(self.validation_fraction * len(classes))))
        if len(classes) - n_val < 2:
            view = _View(backend, self)
            in_val = np.zeros(len(y), dtype=bool)
            in_val[rng.permutation(len(y))[:int(round(self.validation_fraction * len(y)))]] = True
            if in_val.all() or not in_val.any():
                return _QuerySet(Xn, None, view, branches, self, labels=y,
                                 query_ids=query_ids), None
            return [_QuerySet(Xn[mask], None, view, branches, self, labels=y[mask],
                              query_ids=None if query_ids is None else query_ids[mask])
                    for mask in (~in_val, in_val)]
        val_classes = rng.choice(classes, n_val, replace=False)
        in_val = np.isin(y, val_classes)
        sets = []
        memory = backend.memory
        for mask, part in ((~in_val, memory.drop_classes(val_classes)),
                           (in_val, memory.keep_classes(val_classes))):
            ids = None if query_ids is None else query_ids[mask]
            view = _View(self._backend(part, modalities=branches), self)
            sets.append(_QuerySet(Xn[mask], None, view, branches, self, labels=y[mask],
                                  query_ids=ids))
        return sets

    def _optimizer(self, heads):
        return torch.optim.AdamW(
            [p for head in heads.values() for p in head.parameters()],
            lr=self.learning_rate, weight_decay=self.weight_decay,
        )

    def _epoch(self, heads, optimizer, queries, rng):
        """One epoch of training steps over `queries`; returns the mean loss."""
        for head in heads.values():
            head.train()
        total, seen = 0.0, 0
        for step, batch in self._steps(queries, tuple(heads), rng):
            logits = self._logits(heads, step, batch)
            target = _as_tensor(step.codes[batch], logits.device)
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        return total / seen

    def _steps(self, queries, branches, rng):
        """(query set, batch) per step: shuffled batches, or episodes.

        An episode draws ``episode_classes`` classes, up to ``batch_size`` of
        their queries, and restricts retrieval and prototypes to them.
        """
        n_steps = -(-len(queries) // self.batch_size)
        if self.episode_classes is None:
            order = rng.permutation(len(queries))
            for start in range(0, len(order), self.batch_size):
                yield queries, order[start:start + self.batch_size]
            return
        n_classes = len(queries.view.classes)
        n_way = self.episode_classes
        if isinstance(n_way, Real) and not isinstance(n_way, Integral):
            n_way = round(n_way * n_classes)
        n_way = min(max(n_way, 2), n_classes)
        present = np.unique(queries.codes)
        for _ in range(n_steps):
            codes = rng.choice(present, min(n_way, len(present)), replace=False)
            pool = np.flatnonzero(np.isin(queries.codes, codes))
            batch = rng.choice(pool, min(self.batch_size, len(pool)), replace=False)
            episode = _Episode(queries.view, codes)
            ids = None if queries.query_ids is None else queries.query_ids[batch]
            step = _QuerySet(queries.X[batch], np.searchsorted(episode.class_codes,
                             queries.codes[batch]), episode, branches, self, query_ids=ids)
            yield step, np.arange(len(batch))

    @torch.no_grad()
    def _accuracy(self, heads, queries):
        for head in heads.values():
            head.eval()
        hits = 0
        for start in range(0, len(queries), _INFERENCE_BATCH):
            batch = np.arange(start, min(start + _INFERENCE_BATCH, len(queries)))
            predicted = self._logits(heads, queries, batch).argmax(dim=1).cpu().numpy()
            hits += int(np.sum(predicted == queries.codes[batch]))
        return hits / len(queries)

    def _logits(self, heads, queries, batch, state=None, attention=None,
                dtype=torch.float32):
        """Logits (batch, n_classes) of the queries at `batch` (indices or a slice).

        With a published `state` (prediction), identity heads are skipped
        (their output is the query, up to scale) and a head over the
        backend's table runs folded into its cached projections of the whole
        bank (:class:`~skmml.mml._heads.FoldedHead`), its MLP in `dtype`;
        otherwise (training, or a bank of the vectors a search returned)
        keys and values are projected here once per distinct item the batch
        retrieves. With `attention` (a dict), each branch's attention weights
        are appended to its list there.
        """
        cached = state is not None
        device = next(iter(heads.values())).q_proj.weight.device
        query = _as_tensor(queries.X[batch], device)
        z = 0.0
        for branch, head in heads.items():
            prototypes = queries.view.prototype_tensor(branch, device)
            if cached and attention is None and state.identity[branch]:
                z = z + _similarities(query, prototypes)
                continue
            valid = None
            if self.retrieval == "none":
                keys, values = head.project_memory(query)
                rows = torch.arange(len(query), device=device)[:, None]
            else:
                found = queries.slots[branch][batch]
                if not np.all(found >= 0):  # an approximate index found fewer than k
                    valid = _as_tensor(found >= 0, device)
                    found = np.maximum(found, 0)
                if cached and queries.banks[branch] is state.backend.table(branch):
                    # Slots of the backend's table: the head folded into its projections.
                    folded = _projection(state, branch)
                    out, weights = folded(query, _as_tensor(found, device), valid, dtype)
                    z = z + self._branch_logits(out, weights, prototypes, branch, attention)
                    continue
                unique, inverse = np.unique(found, return_inverse=True)
                items = queries.banks[branch].slot_embeddings[unique]
                with torch.autocast(device.type, enabled=False):  # float32, as cached
                    keys, values = head.project_memory(_as_tensor(items, device))
                rows = _as_tensor(inverse.reshape(len(query), -1), device)
            out, weights = head(query, keys, values, rows, valid, return_attention=True)
            z = z + self._branch_logits(out, weights, prototypes, branch, attention)
        return self.logit_scale * z

    @staticmethod
    def _branch_logits(out, weights, prototypes, branch, attention):
        """Cosines of a head's outputs with the prototypes; records `weights` if asked."""
        if attention is not None:
            attention.setdefault(branch, []).append(weights.cpu().numpy())
        with record_function("skmml.mml.prototypes"):
            return _similarities(torch.nn.functional.normalize(out.float(), dim=1),
                                 prototypes)

    # -- the memory ----------------------------------------------------------------------

    def _adopt(self, backend, replace=False, added_ids=None, support=None, view=None,
               heads=None, untrained=None, fitted=None):
        """Publish `backend` (its view: prototypes) with the heads, in one step.

        Everything is built first; then one update installs the new state
        and the public attributes (see :mod:`skmml._state`), so a read sees
        the old classifier or the new one, and a failure changes nothing.
        Few-shot `support` stays through changes of the memory, until a
        replacement.
        """
        fitted = dict(fitted or {})
        previous = getattr(self, "_state", None)
        branches = fitted.get("branches_", None if previous is None else previous.branches)
        if support is not None:
            X, y = support
            X = l2_normalize(self._more_input(X)[0])
            y = np.asarray(y)
            _check_known(y, backend.classes(MODALITIES))
            support = (X, y)
        elif not replace and previous is not None and view is None:
            support = previous.support
        heads = previous.heads if heads is None else heads
        untrained = previous.untrained if untrained is None else untrained
        view = _View(backend, self, support) if view is None else view
        for head in heads.values():
            head.eval()
        state = State(backend=backend, view=view, support=support, heads=heads,
                      branches=branches, untrained=untrained, projected={},
                      identity={b: head.is_identity() for b, head in heads.items()})
        fitted["added_ids_"] = (np.empty(0, dtype=np.int64) if added_ids is None
                                else np.asarray(added_ids))
        publish(self, state, memory_=backend.memory, classes_=view.classes, heads_=heads,
                **fitted)

    def set_memory(self, memory, mode="replace", support=None, *, reassign_ids=False):
        """Replace the memory (unseen classes, no retraining) or expand it.

        Parameters
        ----------
        memory : Memory or MilvusMemory
            The new memory (``mode="replace"``), or the items to add
            (``mode="expand"``, class-incremental: a :class:`Memory`, whose
            ids must not clash). Over a :class:`~skmml.MilvusMemory` the
            classifier predicts, forgets and expands; see :ref:`scale`. It
            must hold two classes or more and, with ``retrieval="knn"``, at
            least ``n_neighbors`` items per branch.
        mode : {"replace", "expand"}, default="replace"
        support : tuple (X, y), default=None
            Few-shot support: labelled query embeddings whose mean becomes
            the image prototype of each of their classes (ProtoNet style).
            It stays in force through :meth:`forget` and expansion, until a
            replacement.
        reassign_ids : bool, default=False
            With ``mode="expand"``, give the added items new ids from the
            memory's high-water mark instead of raising on clashing ids.

        Returns
        -------
        self : MemoryModularClassifier
            The ids that an expansion gave are in ``added_ids_``.
        """
        check_is_fitted(self, "heads_")
        return self._set_memory(memory, mode, reassign_ids, support=support)

    # -- prediction ----------------------------------------------------------------------

    def _queries(self, X, explain=False):
        """(state, queries): one published state for the whole read, and the validated
        queries with their neighbors in it (identity heads need none unless explaining)."""
        state, X = self._snapshot(X)
        search = [b for b in state.branches if explain or not state.identity[b]]
        with record_function("skmml.mml.search"):
            return state, _QuerySet(X, None, state.view, search, self)

    @torch.no_grad()
    def _all_logits(self, state, queries, attention=None):
        device = next(iter(state.heads.values())).q_proj.weight.device
        bfloat16 = self._bfloat16_heads(device)
        dtype = torch.bfloat16 if bfloat16 else torch.float32
        blocks = []
        # Autocast serves the heads that are not folded (retrieval="none", a
        # bank of searched vectors); folded heads take `dtype` for their MLP.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
            for start in range(0, len(queries), _INFERENCE_BATCH):
                batch = slice(start, min(start + _INFERENCE_BATCH, len(queries)))
                logits = self._logits(state.heads, queries, batch, state, attention, dtype)
                blocks.append(logits.float().cpu().numpy())
        return np.concatenate(blocks)

    def _bfloat16_heads(self, device):
        """Whether prediction runs the heads' matrix products in bfloat16."""
        if self.heads_precision == "auto":
            return device.type == "cpu" and bf16_matmul_gain() >= _BF16_MIN_GAIN
        return self.heads_precision == "bfloat16"

    def decision_function(self, X):
        """Logits ``z_c = s * (cos(out_img, p_img_c) + cos(out_txt, p_txt_c))``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        z : ndarray of shape (n_queries, n_classes), or (n_queries,) for two
            classes (``z_1 - z_0``, scikit-learn's convention).
        """
        z = self._all_logits(*self._queries(X))
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X):
        """Softmax of the logits over ``classes_``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        proba : ndarray of shape (n_queries, n_classes)
        """
        return softmax(self._all_logits(*self._queries(X)).astype(np.float64), copy=False)

    def predict(self, X):
        """The class with the largest logit.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        y : ndarray of shape (n_queries,)
        """
        state, queries = self._queries(X)
        return state.view.classes[self._all_logits(state, queries).argmax(axis=1)]

    def explain(self, X):
        """Retrieved items per branch with their attention weights.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_queries, n_features)
            Query embeddings.

        Returns
        -------
        explanation : pandas.DataFrame
            One row per (query, branch, neighbor), the schema of every skmml
            classifier: ``query``, ``modality`` (the branch), ``rank``,
            ``id``, ``label``, ``similarity`` (cosine), ``weight`` (the
            head's attention weight), then the item's metadata columns.
        """
        if self.retrieval == "none":
            raise ValueError("retrieval='none' retrieves nothing to explain.")
        state, queries = self._queries(X, explain=True)
        attention = {}
        self._all_logits(state, queries, attention)
        return pd.concat([
            self._explain_frame(state.backend, branch, queries.neighbors[branch],
                                np.concatenate(attention[branch]))
            for branch in state.branches], ignore_index=True)

    # -- persistence: heads as CPU state dicts, device chosen at load ---------------------
    # Heads still at their initialisation (no trained epoch was kept) are stored
    # as None and re-created from their seed at load: such a classifier pickles
    # to about the size of its memory, not + 12 d^2 floats per head.

    def __getstate__(self):
        state = super().__getstate__()
        if "_state" in state:
            published = self._state
            state["heads_"] = {
                b: None if published.untrained
                else {k: v.detach().cpu() for k, v in h.state_dict().items()}
                for b, h in published.heads.items()
            }
        return state

    def _state_for_pickle(self, published):
        # The heads are stored once, in heads_; projections are a cache.
        return published.replace(heads=None, identity=None, projected={})

    def __setstate__(self, state):
        heads = state.get("heads_")
        if heads is not None:
            # A model trained on a GPU loads on a CPU-only machine, and vice versa.
            device = torch.device(resolve_device(
                "cpu" if state["heads_device"] == "cpu" else "auto"))
            # The heads as fitted: the residual_init parameter may have changed since.
            fresh = _new_heads(tuple(heads), state["n_features_in_"], state["_head_init"],
                               state["_head_seed"], "cpu")
            state["heads_"] = {}
            for branch, weights in heads.items():
                head = fresh[branch]
                if weights is not None:
                    head.load_state_dict(weights)
                state["heads_"][branch] = head.to(device).eval()
            published = state["_state"]
            state["_state"] = published.replace(
                heads=state["heads_"], projected={},
                identity={b: h.is_identity() for b, h in state["heads_"].items()})
        super().__setstate__(state)


_INFERENCE_BATCH = 4096
#: heads_precision="auto" takes bfloat16 where it multiplies this much faster.
_BF16_MIN_GAIN = 1.5


def _check_trainable(backend):
    if not backend.can_train:
        name = type(backend.memory).__name__
        raise TypeError(
            "MemoryModularClassifier trains its heads on an in-RAM Memory (episodes search "
            f"subsets of classes), not a {name}: train with memory.to_memory(), or a "
            f"training memory of your own, then set_memory() the {name} to predict over it."
        )


def _check_known(y, classes):
    unknown = np.setdiff1d(np.unique(y), classes)
    if unknown.size:
        raise ValueError(
            f"Classes of y not in the memory: {unknown[:10].tolist()}. The classes are the "
            "memory's: add a class's items with set_memory(Memory(...), mode='expand') first."
        )


def _similarities(x, prototypes):
    """Cosines of unit rows with the prototypes, in float32 even under autocast."""
    with torch.autocast(x.device.type, enabled=False):
        return x.float() @ prototypes.T


@torch.no_grad()
def _projection(state, branch):
    """The branch's head folded into every item of its bank, computed once per state.

    A :class:`~skmml.mml._heads.FoldedHead`: the keys and values of the
    bank with the head's query and output projections folded in (float32,
    whatever the reader). Readers fill this cache of the published state
    lazily; two readers may both compute it, with the same result.
    """
    projected = state.projected.get(branch)
    if projected is None:
        head = state.heads[branch]
        device = head.q_proj.weight.device
        items = _as_tensor(state.backend.table(branch).slot_embeddings, device)
        with record_function("skmml.mml.memory_projection"):
            projected = state.projected.setdefault(branch, head.fold_memory(items))
    return projected


def _new_heads(branches, dim, residual_init, seed, device):
    """Freshly initialised heads, one per branch, reproducibly from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {b: IntegrationHead(dim, residual_init=residual_init).to(device)
                for b in branches}


class _QuerySet:
    """Queries, their class codes, and their neighbors in a memory view.

    Retrieval is frozen (the embeddings do not change), so each query set
    searches its memory once and every training epoch reuses the neighbors.
    """

    def __init__(self, X, codes, view, branches, estimator, labels=None, query_ids=None):
        self.X, self.view, self.query_ids = X, view, query_ids
        self.codes = codes if labels is None else np.searchsorted(view.classes, labels)
        self.neighbors, self.slots, self.banks = {}, {}, {}
        if estimator.retrieval == "knn":
            for branch in branches:
                self.neighbors[branch], self.slots[branch], self.banks[branch] = (
                    view.neighbors(branch, X, estimator.n_neighbors, query_ids))

    def __len__(self):
        return self.X.shape[0]
