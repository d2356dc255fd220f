"""POPE-style probing (megavlm/inference/pope.py): the scores of a hand-made set of answers against values computed by
hand, the three ways of drawing absent objects on a hand-made set, and LLaVA's yes/no reading of an answer."""

from __future__ import annotations

import pytest

from megavlm.inference.pope import build_questions, format_table, parse_answer, pope_metrics


def test_metrics_equal_hand_computed_values():
    # 10 questions, truth: 5 yes then 5 no; answers: yes yes yes no no | yes no no no yes
    truth = [True] * 5 + [False] * 5
    pred = [True, True, True, False, False, True, False, False, False, True]
    m = pope_metrics(pred, truth)
    # by hand: TP 3, FN 2, FP 2, TN 3 -> accuracy 6/10, precision 3/5, recall 3/5, F1 0.6, yes-ratio 5/10
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 2, 2, 3)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(0.6)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(0.6)
    assert m["yes_ratio"] == pytest.approx(0.5)
    # unbalanced: truth 3 yes / 1 no, answers yes yes no yes -> TP 2, FN 1, FP 1, TN 0
    m = pope_metrics([True, True, False, True], [True, True, True, False])
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 4)
    # a model that always says no: precision (and F1) 0, not a division by zero
    m = pope_metrics([False] * 4, [True, False, True, False])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError):
        pope_metrics([True], [True, False])
    table = format_table({"random": m})
    assert "random" in table.splitlines()[1] and "0.5000" in table


def test_negative_sampling_settings_on_a_hand_made_set():
    # image 0: cat dog; image 1: cat dog; image 2: cat bird; image 3: fish
    # frequency: cat 3, dog 2, bird 1, fish 1; co-occurrence with cat: dog 2, bird 1, fish 0
    objs = [["cat", "dog"], ["cat", "dog"], ["cat", "bird"], ["fish"]]
    vocab = ["fish", "bird", "dog", "cat", "cow"]
    pop = build_questions(objs, "popular", vocabulary=vocab)
    adv = build_questions(objs, "adversarial", vocabulary=vocab)
    rnd = build_questions(objs, "random", seed=3, vocabulary=vocab)
    for qs in (pop, adv, rnd):  # each image: its objects (yes), then as many absent ones (no)
        assert [(i, o) for i, o, t in qs if t] == [(0, "cat"), (0, "dog"), (1, "cat"), (1, "dog"), (2, "cat"),
                                                    (2, "bird"), (3, "fish")]
        for i, o, t in qs:
            assert (o in objs[i]) == t
        assert sum(not t for _, _, t in qs) == 7
    neg = lambda qs, i: [o for j, o, t in qs if j == i and not t]  # noqa: E731
    # popular: the most frequent absent objects (ties: vocabulary order: fish before bird, cow last)
    assert neg(pop, 0) == ["fish", "bird"]
    assert neg(pop, 2) == ["dog", "fish"]
    assert neg(pop, 3) == ["cat"]
    # adversarial: the absent objects that co-occur most with the image's own
    # image 2 (cat, bird): dog co-occurs with cat twice, fish and cow never -> dog, then fish (vocabulary order)
    assert neg(adv, 2) == ["dog", "fish"]
    # image 0 (cat, dog): bird co-occurs with cat once, the rest never -> bird, fish
    assert neg(adv, 0) == ["bird", "fish"]
    # image 3 (fish): nothing co-occurs with fish -> the first absent in vocabulary order
    assert neg(adv, 3) == ["bird"]
    # random: absent objects, seeded (the same seed draws the same)
    assert rnd == build_questions(objs, "random", seed=3, vocabulary=vocab)
    with pytest.raises(ValueError):
        build_questions(objs, "nearest")


def test_answer_parsing_follows_llava():
    assert parse_answer("yes") and parse_answer("Yes, there is a cat.") and parse_answer("yellow")
    assert not parse_answer("no") and not parse_answer("No.") and not parse_answer("There is not a dog.")
    assert parse_answer("Yes. No other animals.")  # only the first sentence counts
