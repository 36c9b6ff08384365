"""genderscore tests: unit/ (pure logic), integration/ (real Redis, real workers), faults/."""
