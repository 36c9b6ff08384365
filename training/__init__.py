"""genderscore training: the origin's CNN trained on the user's labelled pictures."""
