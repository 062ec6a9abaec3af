"""`python -m student_export` = `student-export`."""

from student_export.cli import main

if __name__ == "__main__":
    main()
