"""`python -m student_train` (and `accelerate launch -m student_train`): the student-train CLI."""

from student_train.cli import main

if __name__ == "__main__":
    main()
