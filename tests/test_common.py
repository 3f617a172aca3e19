"""scikit-learn's estimator checks over every public estimator."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from skmml import KNNVoteClassifier, MemoryModularClassifier

# Expected failures, each with its reason; empty while every check passes.
EXPECTED_FAILED_CHECKS = {"KNNVoteClassifier": {}, "MemoryModularClassifier": {}}


def _expected_failed_checks(estimator):
    return EXPECTED_FAILED_CHECKS.get(type(estimator).__name__, {})


@parametrize_with_checks(
    [
        KNNVoteClassifier(),
        KNNVoteClassifier(voting="softmax", index="hnsw"),
        MemoryModularClassifier(max_epochs=3, random_state=0),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
