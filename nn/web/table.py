"""The shots a view shows, as numpy columns: bunch (train) IDs, pulses, probabilities, 0/1 classes and,
where the source has them, out-of-distribution scores and `unknown` flags. Filters, sorting and pages are
numpy operations over whole columns, so a page of a 100,000-shot file takes milliseconds.

Rows are appended (a growing file, a stream) and, with a `capacity`, the oldest are let go; the counts per
class cover every shot ever appended, those let go included. Safe to use from several threads."""
import threading

import numpy as np

GROWTH = 2  # the columns' spare room grows by this factor, so that appending a row costs O(1) on average


class Table:
    def __init__(self, class_names, capacity=None):
        self.class_names = list(class_names)
        self.capacity = capacity
        self.lock = threading.RLock()  # page() holds it across select() and shot()
        width = len(self.class_names)
        self.columns = {"bids": np.zeros(0, np.int64), "pulses": np.zeros(0, np.int64),
                        "probs": np.zeros((0, width), np.float32), "preds": np.zeros((0, width), np.uint8),
                        "ood_score": np.zeros(0, np.float32), "unknown": np.zeros(0, np.uint8)}
        self.length = 0  # rows held
        self.ids = []  # each held row's ID (a string unique within the source)
        self.index = {}  # ID -> row number since the first row ever appended
        self.first = 0  # row number of the first row held
        self.shots = 0  # rows ever appended
        self.counts = np.zeros(width, np.int64)  # shots predicted in each class, ever
        self.hits = 0  # shots predicted in any class but `empty`, ever
        self.has = {"pulses": False, "ood_score": False, "unknown": False}

    def append(self, ids, bids, probs, preds, extra=None):
        """Rows: `ids` (strings), `bids` [N], `probs` and `preds` [N, C]; `extra` may hold "pulses",
        "ood_score" and "unknown" [N]."""
        extra = {k: v for k, v in (extra or {}).items() if v is not None}
        n = len(ids)
        new = {"bids": bids, "probs": probs, "preds": preds, "pulses": extra.get("pulses", np.full(n, -1)),
               "ood_score": extra.get("ood_score", np.full(n, np.nan)), "unknown": extra.get("unknown", np.zeros(n))}
        with self.lock:
            for name in extra:
                self.has[name] = True
            for name, values in new.items():
                self._grow(name, n)
                self.columns[name][self.length:self.length + n] = values
            for i, shot in enumerate(ids):
                self.index[shot] = self.first + len(self.ids) + i
            self.ids.extend(ids)
            self.length += n
            self.shots += n
            decided = np.asarray(preds) > 0
            self.counts += decided.sum(axis=0)
            self.hits += int(self._hit_rows(decided).sum())
            if self.capacity and self.length > self.capacity:
                self._let_go(self.length - self.capacity)

    def _grow(self, name, n):
        column = self.columns[name]
        if self.length + n > len(column):
            bigger = np.zeros((max(GROWTH * len(column), self.length + n),) + column.shape[1:], column.dtype)
            bigger[:self.length] = column[:self.length]
            self.columns[name] = bigger

    def _let_go(self, n):
        for name, column in self.columns.items():
            column[:self.length - n] = column[n:self.length]
        for shot in self.ids[:n]:
            del self.index[shot]
        del self.ids[:n]
        self.length -= n
        self.first += n

    def _hit_rows(self, decided):
        """A hit: a shot predicted in some class other than `empty`."""
        others = [i for i, name in enumerate(self.class_names) if name != "empty"]
        return decided[:, others].any(axis=1)

    def row(self, shot_id):
        """The held row of `shot_id`, or None."""
        with self.lock:
            number = self.index.get(shot_id)
            return None if number is None else number - self.first

    def select(self, cls=None, prob=None, bounds=(0.0, 1.0), sort=None):
        """Held rows, newest first or by class `sort`'s probability (highest first): of those predicted
        in class `cls` (an index; None: all) whose probability of class `prob` lies within `bounds`."""
        with self.lock:
            probs, preds = self.columns["probs"][:self.length], self.columns["preds"][:self.length]
            keep = np.ones(self.length, bool)
            if cls is not None:
                keep &= preds[:, cls] > 0
            if prob is not None:
                keep &= (probs[:, prob] >= bounds[0]) & (probs[:, prob] <= bounds[1])
            rows = np.flatnonzero(keep)
            if sort is None:
                return rows[::-1]
            return rows[np.argsort(-probs[rows, sort], kind="stable")]

    def shot(self, row):
        """The row as the API shows a shot: id, bunch_id, pulse (where the source has pulses),
        probabilities, the names of its predicted classes, ood_score and unknown where present."""
        with self.lock:
            c = self.columns
            probs = c["probs"][row]
            shot = {"id": self.ids[row], "bunch_id": int(c["bids"][row]),
                    "probabilities": [round(float(p), 4) for p in probs],
                    "classes": [n for n, d in zip(self.class_names, c["preds"][row]) if d]}
            if self.has["pulses"]:
                shot["pulse"] = int(c["pulses"][row])
            if self.has["ood_score"]:
                shot["ood_score"] = round(float(c["ood_score"][row]), 4)
            if self.has["unknown"]:
                shot["unknown"] = bool(c["unknown"][row])
            return shot

    def page(self, query, offset, limit):
        """(how many rows `query` (select()'s arguments) selects, the shots of `limit` of them from `offset`)."""
        with self.lock:
            rows = self.select(**query)
            return len(rows), [self.shot(r) for r in rows[offset:offset + limit]]

    def id_text(self, query):
        """Lines `bunch_id<TAB>pulse<TAB>id` of the rows `query` selects (pulse -1 where the source has none)."""
        with self.lock:
            rows = self.select(**query)
            bids, pulses = self.columns["bids"], self.columns["pulses"]
            return "".join(f"{bids[r]}\t{pulses[r]}\t{self.ids[r]}\n" for r in rows)

    def counts_by_name(self):
        with self.lock:
            return {name: int(n) for name, n in zip(self.class_names, self.counts)}, self.shots, self.hits
