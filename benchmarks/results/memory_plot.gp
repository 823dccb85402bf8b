set terminal pngcairo size 900,560 font 'DejaVu Sans,11'
set output 'benchmarks/results/rank_vs_memory.png'
set title 'Training memory of one 4096x4096 layer (batch 512, Adam, fp32)'
set xlabel 'LoRA rank r'
set ylabel 'MiB (log scale)'
set logscale xy 2
set logscale y 10
set key top left
set grid
plot 'benchmarks/results/memory.dat' using 1:2 with linespoints lw 2 pt 7 title 'LoRA: params + grads + Adam + cache', \
     '' using 1:4 with linespoints dt 2 title 'LoRA: A and B', \
     '' using 1:7 with linespoints dt 3 title 'LoRA: activation cache (n r)', \
     '' using 1:3 with lines lw 2 dt 4 lc rgb 'black' title 'full fine-tuning of W'
