"""`TfidfRetriever(corpus)`: scikit-learn TF-IDF retrieval over a corpus id -> text; `search(query, k)` gives
the ids of the k best passages (ties: corpus order)."""

from __future__ import annotations

from collections.abc import Mapping

from connectors.rag.errors import RagError


class TfidfRetriever:
    def __init__(self, corpus: Mapping[str, str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not corpus:
            raise RagError("the corpus is empty")
        self.ids = [str(k) for k in corpus]
        self.vectorizer = TfidfVectorizer(sublinear_tf=True)
        self.matrix = self.vectorizer.fit_transform(list(corpus.values()))  # [N, vocab] sparse, rows L2-normed

    def search(self, query: str, k: int) -> list[str]:
        if k <= 0:
            raise RagError(f"k must be positive, got {k}")
        scores = (self.matrix @ self.vectorizer.transform([query]).T).toarray()[:, 0]  # [N]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.ids[i] for i in order[:k]]
