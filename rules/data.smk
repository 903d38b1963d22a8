# Data sets are materialized once under results/datasets/{dataset}/ (images, labels,
# VQA items). A checkpoint, because the number of images decides the extraction shards.


checkpoint materialize_dataset:
    output:
        directory("results/datasets/{dataset}"),
    params:
        spec=lambda wc: json.dumps(DATASETS[wc.dataset], sort_keys=True),
        on_bad_image=CFG["on_bad_image"],
    log:
        "logs/materialize_dataset/{dataset}.log",
    conda:
        "../envs/data.yaml"
    shell:
        "embedlens materialize --name {wildcards.dataset} --spec {params.spec:q} "
        "--on-bad-image {params.on_bad_image} --out {output} > {log} 2>&1"
