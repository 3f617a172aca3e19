"""ZeroShotCLIPClassifier: CLIP's zero-shot baseline, class prototypes from prompts."""

from numbers import Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.extmath import softmax
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .._validation import input_metadata_kept_on_error, l2_normalize
from ..memory._text import IMAGENET_TEMPLATES, fill_templates
from ._encoders import CLIPTextEncoder

__all__ = ["ZeroShotCLIPClassifier"]


class ZeroShotCLIPClassifier(ClassifierMixin, BaseEstimator):
    """Zero-shot CLIP: each class is the mean embedding of its name in prompt templates.

    The baseline of the memory-modular paper (Radford et al.'s template
    ensemble): the prototype of class ``c`` is the L2-normalised mean of the
    L2-normalised text embeddings of the prompts "a photo of a {c}." etc.,
    and an image embedding goes to the class of highest cosine similarity.
    No image is needed to learn: ``fit`` reads the classes from ``y`` and the
    embedding dimension from ``X``.

    Parameters
    ----------
    text_encoder : transformer, default=None
        Maps a list of prompts to embeddings in the space of the image
        embeddings; None means ``CLIPTextEncoder()`` (OpenAI ViT-B/32).
    templates : "imagenet" or list of str, default="imagenet"
        Prompt templates with one ``{}`` for the class name; "imagenet" is
        CLIP's 80 ImageNet templates (:data:`skmml.memory.IMAGENET_TEMPLATES`).
    class_names : dict, default=None
        Label -> the name written into the prompts; labels missing from it
        (or all, with None) are written as ``str(label)``.
    logit_scale : float, default=100.0
        Temperature of :meth:`predict_proba` (CLIP's learned scale is 100).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    prototypes_ : ndarray of shape (n_classes, n_features)
        Unit-norm text prototype of each class.
    n_features_in_ : int

    Examples
    --------
    A stand-in text encoder whose embedding of a prompt is a letter count,
    so that images (here their embeddings) are matched to names by letters:

    >>> import numpy as np
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from skmml import ZeroShotCLIPClassifier
    >>> letters = FunctionTransformer(lambda texts: np.array(
    ...     [[t.count(ch) + 1e-3 for ch in "cdg"] for t in texts]))
    >>> clf = ZeroShotCLIPClassifier(letters, templates=["{}"])
    >>> clf.fit(np.eye(3), ["cc", "dd", "gg"]).predict([[0.0, 0.0, 1.0]])
    array(['gg'], dtype='<U2')
    """

    _parameter_constraints = {
        "text_encoder": [HasMethods(["transform"]), None],
        "templates": [StrOptions({"imagenet"}), list, tuple],
        "class_names": [dict, None],
        "logit_scale": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, text_encoder=None, *, templates="imagenet", class_names=None,
                 logit_scale=100.0):
        self.text_encoder = text_encoder
        self.templates = templates
        self.class_names = class_names
        self.logit_scale = logit_scale

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y):
        """Embed the prompts of the classes of `y`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Image embeddings; only their dimension is used.
        y : array-like of shape (n_samples,)
            Labels; their classes are the classes to recognise.

        Returns
        -------
        self : ZeroShotCLIPClassifier
        """
        with input_metadata_kept_on_error(self):
            X, y = validate_data(self, X, y, dtype=np.float32)
            check_classification_targets(y)
            classes = np.unique(y)
            templates = IMAGENET_TEMPLATES if self.templates == "imagenet" else self.templates
            if not len(templates) or any(
                    not isinstance(t, str) or t.count("{}") != 1 for t in templates):
                raise ValueError("templates must be strings that each hold one '{}'.")
            names = self.class_names or {}
            prompts = [p for c in classes for p in fill_templates(str(names.get(c, c)), templates)]
            encoder = self.text_encoder
            if encoder is None:
                encoder = CLIPTextEncoder()
            embedded = l2_normalize(np.asarray(encoder.transform(prompts), dtype=np.float32))
            if embedded.shape != (len(prompts), X.shape[1]):
                raise ValueError(
                    f"The text encoder gives {embedded.shape[1]}-dimensional embeddings, X has "
                    f"{X.shape[1]} features: they must share one space."
                )
            means = embedded.reshape(len(classes), len(templates), -1).mean(axis=1)
            self.prototypes_ = l2_normalize(means)
            self.classes_ = classes
        return self

    def decision_function(self, X):
        """Cosine similarity of each image embedding to each class prototype.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        scores : ndarray of shape (n_queries, n_classes), or (n_queries,) for
            two classes (``score_1 - score_0``).
        """
        scores = self._scores(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def _scores(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return l2_normalize(X) @ self.prototypes_.T

    def predict_proba(self, X):
        """Softmax of ``logit_scale`` times the cosine similarities.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        proba : ndarray of shape (n_queries, n_classes)
        """
        return softmax(self.logit_scale * self._scores(X).astype(np.float64), copy=False)

    def predict(self, X):
        """The class of the nearest prototype.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        y : ndarray of shape (n_queries,)
        """
        scores = self._scores(X)
        return self.classes_[scores.argmax(axis=1)]
