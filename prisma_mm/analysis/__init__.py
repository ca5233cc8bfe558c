"""prisma_mm.analysis"""
