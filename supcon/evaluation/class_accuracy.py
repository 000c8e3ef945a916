"""What each class gets: per-class accuracy, its mean, and the many / medium / few-shot groups.

main_ce.py and main_linear.py print these after ``best accuracy`` / ``final accuracy`` and write
the per-class numbers to ``per_class_accuracy.json`` next to the classifier's checkpoint. The
groups are the long-tail literature's (Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an
Open World"): classes with more than 100 training images (many-shot), 20 to 100 (medium), fewer
than 20 (few); a group's accuracy is the mean of its classes' accuracies, so a rare class weighs
as much as a common one whatever the test split holds. A class without test images has no
accuracy and is left out of every mean.
"""

import json
import os

from supcon.system.atomic import atomic_write

MANY_SHOT, FEW_SHOT = 100, 20  # more than 100 training images: many; fewer than 20: few
GROUPS = ('many', 'medium', 'few')
TB_TAGS = {'mean': 'mean_class_acc', 'many': 'many_acc', 'medium': 'medium_acc', 'few': 'few_acc'}


def class_accuracies(correct, total):
    """Top-1 % per class (None for a class without test images)."""
    return [100.0 * c / n if n else None for c, n in zip(correct, total)]


def mean_of(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def shot_group(train_count):
    if train_count > MANY_SHOT:
        return 'many'
    return 'few' if train_count < FEW_SHOT else 'medium'


def thirds(train_counts):
    """Class indices by training count, most first (ties: data-set order), cut into 3 parts
    whose sizes differ by at most one (the first parts the larger)."""
    order = sorted(range(len(train_counts)), key=lambda c: (-train_counts[c], c))
    size, extra = divmod(len(order), 3)
    parts, start = [], 0
    for part in range(3):
        end = start + size + (part < extra)
        parts.append(order[start:end])
        start = end
    return parts


def summarize(correct, total, train_counts):
    """{'mean', 'many', 'medium', 'few', 'thirds': [3 values]}: accuracies in %, None if empty."""
    accs = class_accuracies(correct, total)
    summary = {'mean': mean_of(accs)}
    for group in GROUPS:
        summary[group] = mean_of([a for a, n in zip(accs, train_counts) if shot_group(n) == group])
    summary['thirds'] = [mean_of([accs[c] for c in part]) for part in thirds(train_counts)]
    return summary


def _text(value):
    return '-' if value is None else f'{value:.2f}'


def report_lines(summary):
    """The printed lines; the thirds only when a shot group is empty."""
    lines = [
        f'mean per-class accuracy: {_text(summary["mean"])}',
        'many / medium / few-shot accuracy: '
        + ' / '.join(_text(summary[group]) for group in GROUPS),
    ]
    if any(summary[group] is None for group in GROUPS):
        lines.append(
            'thirds by training count (many / medium / few): '
            + ' / '.join(_text(value) for value in summary['thirds'])
        )
    return lines


def log_summary(logger, summary, epoch):
    """TensorBoard: mean_class_acc and each non-empty group's accuracy."""
    for key, tag in TB_TAGS.items():
        if summary[key] is not None:
            logger.log_value(tag, summary[key], epoch)


def write_json(path, classes, train_counts, correct, total, epoch):
    """``path`` (atomically): each class's name, training and test counts and top-1 %."""
    accs = class_accuracies(correct, total)
    summary = summarize(correct, total, train_counts)
    report = {
        'epoch': epoch,
        'groups': {
            'many': f'> {MANY_SHOT}',
            'medium': f'{FEW_SHOT}-{MANY_SHOT}',
            'few': f'< {FEW_SHOT} training images',
        },
        'mean_class_acc': summary['mean'],
        **{f'{group}_acc': summary[group] for group in GROUPS},
        'thirds_acc': summary['thirds'],
        'classes': [
            {
                'class': str(name),
                'train_count': int(n_train),
                'test_count': int(n_test),
                'accuracy': acc,
                'group': shot_group(n_train),
            }
            for name, n_train, n_test, acc in zip(classes, train_counts, total, accs)
        ],
    }
    text = json.dumps(report, indent=1, allow_nan=False) + '\n'
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def training_counts(dataset, num_classes):
    """Images per class of the training split (the long-tailed one of a long-tail run)."""
    counts = [0] * num_classes
    for label in dataset.targets:
        counts[int(label)] += 1
    return counts


def report(save_folder, classes, train_counts, class_counts, epoch):
    """Print the per-class lines and write ``per_class_accuracy.json`` into ``save_folder``;
    ``class_counts`` is validate's ``(correct, total)``. Call on the main process."""
    correct, total = class_counts
    for line in report_lines(summarize(correct, total, train_counts)):
        print(line, flush=True)
    path = os.path.join(save_folder, 'per_class_accuracy.json')
    return write_json(path, classes, train_counts, correct, total, epoch)
