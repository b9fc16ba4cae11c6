from slug import slugify


def test_words_are_joined_by_hyphens():
    assert slugify("Hello, World!") == "hello-world"


def test_edges_are_trimmed():
    assert slugify("  --Conductor runs agents--  ") == "conductor-runs-agents"
