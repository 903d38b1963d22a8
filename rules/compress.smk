# Compression benchmark (docs/methods.md 4): interventions at inference on the VQA items.
# Data sets without VQA items (e.g. skimage) have no compress job (see has_vqa).


rule compress_benchmark:
    input:
        model=model_input,
        categories="results/analysis/{model}/{dataset}/categorize",
        align="results/analysis/{model}/{dataset}/align",
        dataset="results/datasets/{dataset}",
    output:
        directory("results/analysis/{model}/{dataset}/compress"),
    params:
        model_dir=lambda wc: model_dir(wc.model),
        settings=model_section("compress", lambda wc: {"device": extraction(wc.model)["device"],
                                                       "dtype": extraction(wc.model)["compute_dtype"]}),
        trust=trust_flag,
    resources:
        gpu=lambda wc: uses_gpu(wc.model),
    log:
        "logs/compress_benchmark/{model}/{dataset}.log",
    conda:
        "../envs/analyze.yaml"
    shell:
        "embedlens compress --model-dir {params.model_dir:q} {params.trust} "
        "--dataset-dir {input.dataset} --categories {input.categories} "
        "--align {input.align} --settings {params.settings:q} "
        "--model-name {wildcards.model} --dataset-name {wildcards.dataset} "
        "--out {output} > {log} 2>&1"
