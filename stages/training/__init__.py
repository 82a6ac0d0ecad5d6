"""Stage two's training loop: the student, its settings, precision, metrics, and one loop for train, distill and online runs."""
