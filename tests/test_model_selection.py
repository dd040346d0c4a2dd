import numpy as np
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.model_selection import GridSearchCV, check_cv, cross_validate

from skdattri.model_selection import SelfInfluenceSplit, TrainQuerySplit


def test_train_query_split_indices():
    X = np.zeros((7, 2))
    cv = TrainQuerySplit(n_train=4)
    splits = list(cv.split(X))
    assert len(splits) == cv.get_n_splits(X) == cv.get_n_splits() == 1
    train, query = splits[0]
    np.testing.assert_array_equal(train, [0, 1, 2, 3])
    np.testing.assert_array_equal(query, [4, 5, 6])


@pytest.mark.parametrize("n_train", [0, 5, 6, -1])
def test_train_query_split_rejects_bad_n_train(n_train):
    with pytest.raises(ValueError, match="n_train"):
        list(TrainQuerySplit(n_train=n_train).split(np.zeros((5, 1))))


@pytest.mark.parametrize("n_train", [2.5, "3", True])
def test_train_query_split_rejects_non_int(n_train):
    with pytest.raises(TypeError, match="n_train must be an int"):
        list(TrainQuerySplit(n_train=n_train).split(np.zeros((5, 1))))


def test_self_influence_split_indices():
    cv = SelfInfluenceSplit()
    (train, test), = list(cv.split(np.zeros((4, 3)), np.arange(4)))
    np.testing.assert_array_equal(train, np.arange(4))
    np.testing.assert_array_equal(test, np.arange(4))
    assert cv.get_n_splits() == 1


def test_self_influence_split_rejects_empty_data():
    with pytest.raises(ValueError, match="empty"):
        list(SelfInfluenceSplit().split(np.zeros((0, 2))))


def test_repr_clone_and_check_cv():
    cv = TrainQuerySplit(n_train=3)
    assert repr(cv) == "TrainQuerySplit(n_train=3)"
    assert repr(SelfInfluenceSplit()) == "SelfInfluenceSplit()"
    assert check_cv(cv) is cv


def test_groups_are_ignored_with_warning():
    with pytest.warns(UserWarning, match="groups parameter is ignored"):
        list(TrainQuerySplit(2).split(np.zeros((4, 1)), groups=np.arange(4)))
    with pytest.warns(UserWarning, match="groups parameter is ignored"):
        list(SelfInfluenceSplit().split(np.zeros((4, 1)), groups=np.arange(4)))


def test_splitters_drive_sklearn_model_selection():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(10, 2))
    y = np.array([0, 1, 0, 1, 0, 0, 1, 1, 1, 1])

    def n_rows(estimator, X, y):
        return float(len(X))

    res = cross_validate(
        DummyClassifier(strategy="most_frequent"),
        X,
        y,
        cv=TrainQuerySplit(n_train=6),
        scoring=n_rows,
        return_indices=True,
    )
    np.testing.assert_array_equal(res["indices"]["train"][0], np.arange(6))
    np.testing.assert_array_equal(res["indices"]["test"][0], np.arange(6, 10))
    assert res["test_score"].tolist() == [4.0]

    search = GridSearchCV(
        DummyClassifier(),
        {"strategy": ["most_frequent", "prior"]},
        scoring=n_rows,
        cv=SelfInfluenceSplit(),
        refit=False,
    ).fit(X, y)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], [10.0, 10.0])
