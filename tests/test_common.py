"""scikit-learn's estimator checks over every public estimator."""

import numpy as np
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmml import (CLIPImageEncoder, CLIPTextEncoder, KNNVoteClassifier,
                   MemoryModularClassifier, TimmImageEncoder, ZeroShotCLIPClassifier)


def _letter_counts(texts):
    """A stand-in text encoder: 4-dimensional letter counts of each prompt."""
    return np.array([[t.count(c) + 0.1 for c in "0123"] for t in texts])


_FIXED_DIM = ("fit needs X's width to equal the text encoder's embedding dimension (4); "
              "the check's X has another width")

# Expected failures, each with its reason.
EXPECTED_FAILED_CHECKS = {
    "ZeroShotCLIPClassifier": dict.fromkeys([
        "check_classifier_data_not_an_array", "check_classifiers_classes",
        "check_classifiers_one_label", "check_classifiers_train",
        "check_decision_proba_consistency", "check_dict_unchanged",
        "check_dont_overwrite_parameters", "check_dtype_object", "check_estimators_dtypes",
        "check_estimators_fit_returns_self", "check_estimators_nan_inf",
        "check_estimators_overwrite_params", "check_estimators_pickle",
        "check_f_contiguous_array_estimator", "check_fit2d_1feature", "check_fit2d_1sample",
        "check_fit2d_predict1d", "check_fit_check_is_fitted", "check_fit_idempotent",
        "check_fit_score_takes_y", "check_methods_sample_order_invariance",
        "check_methods_subset_invariance", "check_n_features_in",
        "check_pipeline_consistency", "check_readonly_memmap_input", "check_supervised_y_2d",
    ], _FIXED_DIM),
}


def _expected_failed_checks(estimator):
    return EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {})


# The encoders take images and texts, not 2-d arrays: scikit-learn runs only
# the checks that apply to such estimators (cloning, parameters, tags).
@parametrize_with_checks(
    [
        KNNVoteClassifier(),
        KNNVoteClassifier(voting="softmax", index="hnsw"),
        MemoryModularClassifier(n_neighbors=3, max_epochs=3, random_state=0),
        ZeroShotCLIPClassifier(FunctionTransformer(_letter_counts), templates=["{}"]),
        CLIPImageEncoder(),
        CLIPTextEncoder(),
        TimmImageEncoder(),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
