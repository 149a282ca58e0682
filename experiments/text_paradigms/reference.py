"""A reference for task B without any pre-trained model: bag-of-words
logistic regression on the same first ``b_length`` characters.

Words are lower-cased runs of letters and apostrophes; the vocabulary is
the training set's words seen in at least two speeches; features are
``log(1 + count)``, each row scaled to unit norm; the classifier is a
softmax regression fit by 300 steps of full-batch gradient descent (step 2,
L2 1e-4) from zero. It says how much of the speaker can be read from these
characters by word identity alone.
"""

from collections import Counter
import re

import numpy as np

_WORD = re.compile(r"[a-z']+")


def _features(texts, length, vocab=None):
  docs = [_WORD.findall(str(t)[:length].lower()) for t in texts]
  if vocab is None:
    counts = Counter(w for doc in docs for w in set(doc))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items()
                                               if c >= 2))}
  x = np.zeros((len(docs), max(len(vocab), 1)))
  for i, doc in enumerate(docs):
    for w in doc:
      if w in vocab:
        x[i, vocab[w]] += 1
  x = np.log1p(x)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9), vocab


def bag_of_words_accuracy(train_texts, train_labels, test_texts, test_labels,
                          *, length: int, num_classes: int = 10,
                          steps: int = 300, lr: float = 2.0,
                          l2: float = 1e-4) -> float:
  """Test accuracy of the bag-of-words softmax regression."""
  x, vocab = _features(train_texts, length)
  x_test, _ = _features(test_texts, length, vocab)
  y = np.asarray(train_labels)
  w = np.zeros((x.shape[1], num_classes))
  for _ in range(steps):
    z = x @ w
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    w -= lr * (x.T @ p / len(y) + l2 * w)
  return float(np.mean(np.argmax(x_test @ w, axis=1)
                       == np.asarray(test_labels)))
