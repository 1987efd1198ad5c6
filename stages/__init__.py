"""One module per pipeline stage: train_teacher (0), cache_teacher (1), compute_stats (2), train_student (3), grid."""
