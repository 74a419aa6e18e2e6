rule train_student:
    input:
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
        # only distilling variants wait for (and are re-run with) the teacher: raw or refined targets
        flows=teacher_cache_for,
    output:
        model=model_file("student_{variant}"),
        losses=f"{RESULTS}/training/student_{{variant}}_loss.csv",
        validation=f"{RESULTS}/training/student_{{variant}}_validation.csv",
    params:
        checkpoint=lambda wc: f"{RESULTS}/checkpoints/student_{wc.variant}.ckpt",
        # a changed variant definition reruns that variant (--rerun-triggers params)
        settings=lambda wc: config["students"]["variants"][wc.variant],
    log:
        f"{RESULTS}/logs/train_student_{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_student_{{variant}}.tsv"
    threads: train_threads
    # below the teacher and its cache, above the VoxelMorph peer: a teacher-taught student is the
    # last link of the critical path (teacher -> cache -> student) and starts the moment the cache
    # is written; at equal priority the 2-core default run started the unsupervised twin there and
    # the taught student 114 s later, when VoxelMorph freed its core. An unsupervised student, ready
    # at the start, now runs beside the teacher and VoxelMorph after it
    priority: 8
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/train_student.py"


rule train_voxelmorph:
    input:
        subjects=rules.preprocess.output.subjects,
        pairs=rules.preprocess.output.pairs,
    output:
        model=model_file("peer_voxelmorph"),
        losses=f"{RESULTS}/training/peer_voxelmorph_loss.csv",
        validation=f"{RESULTS}/training/peer_voxelmorph_validation.csv",
    params:
        checkpoint=f"{RESULTS}/checkpoints/peer_voxelmorph.ckpt",
        settings=PEERS["voxelmorph"],
    log:
        f"{RESULTS}/logs/train_voxelmorph.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_voxelmorph.tsv"
    threads: train_threads
    # the longest job that needs no teacher (650 s beside another job on 2 cores of an AMD EPYC
    # Zen 4): below the students (see train_student), above the evaluations
    priority: 7
    resources:
        mem_mb=4000,
        gpu=0,
    conda:
        "../../envs/ldreg.yaml"
    script:
        "../scripts/train_voxelmorph.py"
