"""Few-step students of trained models: latent consistency distillation (Luo et al. 2023), `ldm distill`.

    consistency.py  the math: the solver grid, the forward process, the teacher's DDIM step, the boundary conditions
                    c_skip/c_out and the consistency function, the loss
    teacher.py      the teacher's folder read and checked against the config (bad input refused before any work),
                    and its guided prediction for a batch
    student.py      the student's pipeline folder (LCMScheduler, its own step count) and its README
    task.py         the distillation as a task of the training spine (student + EMA target in one module), and
                    `train_distill`, the body of `ldm distill`
"""
