"""`python -m teacher_dump` = the `teacher-dump` command (also under `accelerate launch -m`)."""

from teacher_dump.cli import main

if __name__ == "__main__":
    main()
